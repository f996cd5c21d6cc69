"""The one checkpoint loader: name → folder → config → model on the meta device → weights → tied
embeddings → generation config. `Llama.from_pretrained` is it for one process; training's FSDP
loader (`eeyore/train/parallel.py`) is it plus a `distribute` step that shards the model and
broadcasts rank 0's weights.

The model is built on the meta device, so no memory goes to a random initialisation: the
checkpoint's tensors become the parameters (one process) or fill the shards (FSDP).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import LlamaConfig
from .lookup import find_model_dir
from .weights import load_state_dict

TIED_HEAD = "lm_head.weight"
EMBEDDINGS = "model.embed_tokens.weight"


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """A checkpoint folder: a local folder, a hub id in the local HF cache, or None for the
    embedded default model (converted from its GGUF file the first time)."""
    if name_or_path is not None:
        return find_model_dir(name_or_path)
    # Imported here, not at the top: `llama.py` imports this module, so a top-level import would
    # load `convert` with the package and `python -m eeyore.model.convert` would warn that it ran
    # a module already imported.
    from .convert import ensure_default_model

    return ensure_default_model()


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or a name (`bfloat16`, `bf16`, `float32`, a config's `torch_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(dtype, dtype)
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def read_weights(model_dir: Path, config: LlamaConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's full state dict; with tied embeddings the head is the embedding tensor
    itself (HF stores it once), so both names are present as the model's state dict has them."""
    state = load_state_dict(model_dir, dtype, device)
    if config.tie_word_embeddings:
        state[TIED_HEAD] = state[EMBEDDINGS]
    return state


def load_pretrained(
    model_cls: Callable[[LlamaConfig], nn.Module],
    name_or_path: str | Path | None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    distribute: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
    read: bool = True,
) -> nn.Module:
    """A `model_cls` holding the checkpoint `name_or_path` names, in `dtype` (default: the config's).

    Without `distribute` the weights are read onto `device` and become the parameters. With it,
    `distribute(model, state)` places them (FSDP: shard, then fill the shards from rank 0's
    `state`); `read=False` skips reading on the ranks that only receive.
    """
    model_dir = resolve_model_dir(name_or_path)
    config = LlamaConfig.from_file(model_dir)
    dtype = resolve_dtype(dtype if dtype is not None else config.torch_dtype)
    with torch.device("meta"):
        model = model_cls(config).to(dtype)
    state = read_weights(model_dir, config, dtype, device) if read else {}
    if read:
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{model_dir}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if distribute is None:
        model.load_state_dict(state, assign=True)
        if config.tie_word_embeddings:  # assigning gave the head a Parameter of its own: share the embedding's again
            model.lm_head.weight = model.model.embed_tokens.weight
    else:
        distribute(model, state)
    gen = model_dir / "generation_config.json"
    model.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
    model.name_or_path = str(model_dir)
    return model
