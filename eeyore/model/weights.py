"""Weights in and out of safetensors files (finding the checkpoint is `lookup.py`'s job).

Weights only ever load from safetensors (never from pickles), one tensor at a time, straight
into the requested dtype and device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{model_dir} has no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file")
    return found


def iter_tensors(model_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs one at a time, converted to `dtype` on `device`."""
    for file in _weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor if dtype is None else tensor.to(dtype)


def load_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_tensors(Path(model_dir), dtype, device))


def _shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def default_generation_config(config: LlamaConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id}
    eos = config.eos_token_id
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out


def save_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: LlamaConfig,
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF-format checkpoint that transformers and vLLM load without conversion.

    Every file is written under a temporary name and renamed into place, so a crash never
    leaves a half-written file that looks complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF stores tied weights once
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.torch_dtype = str(dtypes.pop()).removeprefix("torch.")
    shards = _shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        tmp = out / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates owner-only files; a checkpoint is meant to be shared
        os.replace(tmp, out / name)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", config.to_hf())
    _write_json(out / "generation_config.json", generation_config or default_generation_config(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
