"""Low-rank adapters (LoRA) on a Llama's projections, and the two forms a LoRA run is saved in.

An adapted projection keeps its weight W, frozen, and gains two small trainable matrices, named
as PEFT names them: `lora_A.weight` [r, in] and `lora_B.weight` [out, r]. Its output becomes

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

A starts as PEFT's (Kaiming-uniform, a = sqrt(5), drawn from a generator seeded by --seed), B at
zero, so training starts exactly at the base model. The adapters are child modules of the
projection and the extra term a forward hook, so the base keeps HF's parameter names (and
checkpoints), and FSDP2 shards each adapter with its block.

Saved: the merged model (W + (alpha / r) B A: what the server and transformers load) and, in
`<save_path>/adapter`, the adapter alone in PEFT's layout (`adapter_config.json`,
`adapter_model.safetensors` with keys `base_model.model.<projection>.lora_A.weight`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]  # projection names: q_proj ... down_proj
    seed: int = 42

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _add_term(proj: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    if not proj.lora_enabled:
        return out
    return out + proj.lora_B(proj.lora_A(proj.lora_dropout(inputs[0]))) * proj.lora_scale


def adapted_projections(model: nn.Module, modules: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in modules and ".layers." in f".{name}":
            yield name, module


def add_adapters(model: nn.Module, spec: LoRASpec) -> None:
    """Give each named projection its adapter (on any device, meta included) and freeze the rest."""
    model.requires_grad_(False)
    for _, proj in adapted_projections(model, spec.modules):
        proj.lora_A = nn.Linear(proj.in_features, spec.rank, bias=False, device=proj.weight.device, dtype=proj.weight.dtype)
        proj.lora_B = nn.Linear(spec.rank, proj.out_features, bias=False, device=proj.weight.device, dtype=proj.weight.dtype)
        proj.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        proj.lora_scale, proj.lora_enabled = spec.scale, True
        proj.register_forward_hook(_add_term)


def initial_adapters(model: nn.Module, spec: LoRASpec) -> dict[str, torch.Tensor]:
    """Whole initial adapter tensors (CPU, fp32), the same on every machine for a given seed."""
    gen = torch.Generator().manual_seed(spec.seed)
    out = {}
    for name, proj in adapted_projections(model, spec.modules):
        a = torch.empty(spec.rank, proj.in_features)
        bound = 1 / math.sqrt(proj.in_features)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound gain*sqrt(3/fan_in)
        out[f"{name}.lora_A.weight"] = a.uniform_(-bound, bound, generator=gen)
        out[f"{name}.lora_B.weight"] = torch.zeros(proj.out_features, spec.rank)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone (DPO's reference without a second copy of the weights)."""
    adapted = [m for m in model.modules() if hasattr(m, "lora_enabled")]
    for m in adapted:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in adapted:
            m.lora_enabled = True


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def split_merged(state: dict[str, torch.Tensor], spec: LoRASpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the merged HF state dict, the adapter alone under PEFT's key names) from a full state dict."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    adapter = {}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        proj = key.removesuffix(".lora_A.weight")
        a, b = state[key].float(), state[f"{proj}.lora_B.weight"].float()
        weight = merged[f"{proj}.weight"]
        merged[f"{proj}.weight"] = (weight.float() + spec.scale * (b @ a)).to(weight.dtype)
        adapter[PEFT_PREFIX + key], adapter[PEFT_PREFIX + f"{proj}.lora_B.weight"] = state[key], state[f"{proj}.lora_B.weight"]
    return merged, adapter


def save_adapter(out_dir: str | Path, adapter: dict[str, torch.Tensor], spec: LoRASpec, base: str) -> None:
    """`adapter_config.json` + `adapter_model.safetensors`, as PEFT's `save_pretrained` lays them out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": sorted(spec.modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False,
    }
    tmp = out / "adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in adapter.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, out / "adapter_model.safetensors")
    (out / "adapter_config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out / "adapter_config.json.tmp", out / "adapter_config.json")
