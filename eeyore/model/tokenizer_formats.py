"""Tokenizer files that are not `tokenizer.json`, turned into `tokenizers` backends.

- Meta's tiktoken `tokenizer.model` (Llama 3): base64 token bytes and a rank per line.
  Byte-pair encoding by rank is the same algorithm as BPE with one merge `(left, right)` per way
  of splitting each token into two tokens, ranked by the rank of the result, so it becomes a
  `tokenizers` BPE; Meta's 256 special tokens are added on top of the ranks.
- SentencePiece `tokenizer.model` protobufs (Llama 2 family): pieces, scores and normalizer
  settings become a `tokenizers` BPE or Unigram with the same normalization.
- `byte_level_bpe` also builds the tokenizer of GGUF files (see convert.py).
"""
from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError
from sentencepiece.sentencepiece_model_pb2 import ModelProto, TrainerSpec
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# Meta's pre-tokenizer regex for Llama 3 (from its reference tokenizer).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's named Llama 3 specials; the rest of the 256 ids after the ranks are reserved.
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
]  # fmt: skip
LLAMA3_NUM_SPECIALS = 256


@dataclass
class SpecialTokens:
    """The special tokens a tokenizer file implies (tokenizer_config.json may override them)."""

    bos: str | None = None
    eos: list[str] = field(default_factory=list)
    pad: str | None = None
    unk: str | None = None


def load_tokenizer_model(path: Path) -> tuple[Backend, SpecialTokens]:
    """A `tokenizer.model` file, told apart by content: tiktoken lines or a SentencePiece protobuf."""
    head = path.read_bytes()[:256]
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
        return _from_tiktoken(path)
    try:
        return _from_sentencepiece(path)
    except ValueError as exc:
        raise ValueError(
            f"{path}: neither a tiktoken BPE file (base64 token and rank per line) nor a "
            f"SentencePiece model (protobuf): {exc}"
        ) from None


# --- byte-level BPE (tiktoken, GGUF "gpt2" vocabularies) ---------------------------------------


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, the spelling of byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the others map to chr(256 + n) in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


def byte_level_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    split: pre_tokenizers.PreTokenizer,
    *,
    special: Sequence[str] = (),
    added: Sequence[str] = (),
    ignore_merges: bool = False,
    bos: str | None = None,
) -> Backend:
    """A byte-level BPE `tokenizers` backend: `split` cuts text into words (before bytes are
    mapped to the alphabet); `special` and `added` are matched whole in the text; `bos` is
    prepended by the post-processor when HF callers ask for special tokens."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return backend


def _from_tiktoken(path: Path) -> tuple[Backend, SpecialTokens]:
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous ids 0..{len(ranks) - 1}")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every
    # split of every token, ordered by the token's rank, makes BPE pick the same pair each time.
    splits = sorted(
        (rank, token[:k], token[k:])
        for token, rank in ranks.items()
        for k in range(1, len(token))
        if token[:k] in ranks and token[k:] in ranks
    )
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    specials = LLAMA3_NAMED_SPECIALS + [
        f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS))
    ]
    vocab = {spell(t): r for t, r in ranks.items()}
    vocab.update({s: len(ranks) + i for i, s in enumerate(specials)})
    backend = byte_level_bpe(
        vocab,
        [(spell(a), spell(b)) for _, a, b in splits],
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        special=specials,
        ignore_merges=True,  # tiktoken takes a whole word that is itself a token without merging
        bos="<|begin_of_text|>",
    )
    stop = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]  # Meta's stop tokens, its eos first
    return backend, SpecialTokens("<|begin_of_text|>", stop, pad="<|finetune_right_pad_id|>")


# --- SentencePiece ---------------------------------------------------------------------------

_PieceType = ModelProto.SentencePiece.Type  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, ...


def _read_sentencepiece(path: Path) -> ModelProto:
    """The ModelProto of a SentencePiece file; unset settings read as the schema's defaults."""
    try:
        proto = ModelProto.FromString(path.read_bytes())
    except DecodeError as exc:  # not a ValueError: load_tokenizer_model only catches those
        raise ValueError(f"not a SentencePiece ModelProto ({exc})") from None
    if not proto.pieces:
        raise ValueError("no pieces found")
    return proto


def _from_sentencepiece(path: Path) -> tuple[Backend, SpecialTokens]:
    proto = _read_sentencepiece(path)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: SentencePiece models with treat_whitespace_as_suffix are not supported")
    if trainer.model_type == TrainerSpec.ModelType.BPE:
        normal = {p: (-score, i) for i, (p, score, kind) in enumerate(pieces) if kind == _PieceType.NORMAL}
        # SentencePiece BPE merges the adjacent pair whose union is the best-scored piece.
        merges = sorted(
            (normal[p], p[:k], p[k:]) for p in normal for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal
        )
        model = models.BPE(
            vocab={p: i for i, (p, _, _) in enumerate(pieces)},
            merges=[(a, b) for _, a, b in merges],
            unk_token=pieces[trainer.unk_id][0],
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    elif trainer.model_type == TrainerSpec.ModelType.UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], trainer.unk_id, trainer.byte_fallback)
    else:
        kind = TrainerSpec.ModelType.Name(trainer.model_type)
        raise ValueError(f"{path}: SentencePiece model type {kind} is not supported")
    backend = Backend(model)
    space = "▁" if normalizer.escape_whitespaces else " "
    charsmap = normalizer.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if normalizer.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))  # skipped on empty text, as SentencePiece does
    if normalizer.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " ")] if normalizer.escape_whitespaces else []
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if normalizer.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    special = (_PieceType.CONTROL, _PieceType.UNKNOWN)
    backend.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, _, kind in pieces if kind in special]
    )
    backend.add_tokens(
        [AddedToken(p, special=False, normalized=False) for p, _, kind in pieces if kind == _PieceType.USER_DEFINED]
    )

    def piece(index: int) -> str | None:
        return pieces[index][0] if 0 <= index < len(pieces) else None

    bos = piece(trainer.bos_id)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)]
        )
    eos = piece(trainer.eos_id)
    return backend, SpecialTokens(bos, [eos] if eos else [], piece(trainer.pad_id), piece(trainer.unk_id))
