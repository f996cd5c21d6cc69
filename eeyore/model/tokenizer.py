"""One tokenizer interface over the three formats Llama-family checkpoints ship.

- `tokenizer.json` (HF): loaded as is by the `tokenizers` library.
- `tokenizer.model` in Meta's tiktoken format (Llama 3) or as a SentencePiece protobuf
  (Llama 2 family): converted to a `tokenizers` backend by tokenizer_formats.py.

Every format therefore encodes through one path (`tokenizers`) and saves as `tokenizer.json`,
which transformers and vLLM read. Special tokens written in the text are parsed as special, and
`encode` never adds a bos token: chat templates write it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders

from .lookup import resolve_hub_path
from .tokenizer_formats import SpecialTokens, load_tokenizer_model


class Tokenizer:
    """A `tokenizers` backend plus the special tokens and chat template of a checkpoint.

    `eos_ids[0]` is the tokenizer's own eos token (the one training appends); the rest are the
    other ids that end generation (from `generation_config.json` when the directory has one).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        self.backend = backend
        self.source = source
        self.bos_token, self.pad_token, self.unk_token = bos_token, pad_token, unk_token
        self.eos_tokens = list(dict.fromkeys(eos_tokens))
        self.chat_template = chat_template
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_ids = [self._special_id(t, "eos_token") for t in self.eos_tokens]
        self.pad_id = self._special_id(pad_token, "pad_token")

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load from a checkpoint directory (or a tokenizer file inside one, or a hub id in the local cache).

        `tokenizer.json` wins over `tokenizer.model`; `tokenizer_config.json`,
        `chat_template.jinja` and `generation_config.json` beside it are read when present.
        """
        path = Path(path).expanduser()
        if not path.exists():  # a hub id in the local HF cache, or a clear error
            path = resolve_hub_path(str(path))
        directory = path if path.is_dir() else path.parent
        file = path if path.is_file() else next(
            (directory / n for n in ("tokenizer.json", "tokenizer.model") if (directory / n).is_file()), None
        )
        if file is None:
            raise FileNotFoundError(f"{directory} has no tokenizer.json or tokenizer.model")
        if file.suffix == ".json":
            try:
                backend, implied = Backend.from_file(str(file)), SpecialTokens()
            except Exception as exc:  # the Rust loader raises a bare Exception on bad JSON
                raise ValueError(f"{file}: not a valid tokenizer.json: {exc}") from None
        else:
            backend, implied = load_tokenizer_model(file)
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        eos = [_token_content(config.get("eos_token"))] if config.get("eos_token") else list(implied.eos)
        extra_eos = generation.get("eos_token_id") or []
        for token_id in [extra_eos] if isinstance(extra_eos, int) else extra_eos:
            token = backend.id_to_token(token_id)
            if token is None:
                raise ValueError(f"{directory / 'generation_config.json'}: eos_token_id {token_id} is outside the vocabulary")
            eos.append(token)
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")) or implied.bos,
            eos_tokens=eos,
            pad_token=_token_content(config.get("pad_token")) or implied.pad,
            unk_token=_token_content(config.get("unk_token")) or implied.unk,
            chat_template=_read_chat_template(directory, config),
            source=str(file),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, context: Sequence[int] = (), skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder for generated ids; `context` (e.g. the prompt's last ids) lets
        tokenizers that drop a leading space on the first token (SentencePiece) decode the first
        generated token as it reads in the middle of the text."""
        return StreamDecoder(self.backend, context, skip_special_tokens)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        special = {k: v for k, v in special.items() if v is not None}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2**31 - 1,
            **special,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        return out


class StreamDecoder:
    """Turns generated ids into text chunks one id at a time, never emitting half a UTF-8
    character: an id that ends inside a multi-byte character yields "" until the character is
    complete. The chunks of a stream add up to `decode` of its ids."""

    def __init__(self, backend: Backend, context: Sequence[int] = (), skip_special_tokens: bool = False) -> None:
        self._backend = backend
        self._stream = decoders.DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` (newer checkpoints) wins over the `chat_template` key, which may also
    be a list of named templates (then the one named "default")."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: chat_template list has no 'default' entry")
        template = named["default"]
    return template
