"""The trainers' command line: every flag of OpenRLHF v0.8.2's train_sft and train_dpo, answered.

Each of OpenRLHF's flags is accepted, so its command lines run unchanged, and gets one of three
answers, which `--help` states:

- implemented: a field of the run's typed config (`config.py`), with OpenRLHF's meaning;
- mapped: OpenRLHF's DeepSpeed knob has an FSDP2 / torch equivalent that is always on or is
  reached another way (the help says which);
- refused: the feature does not exist here (MoE-only, DeepSpeed-internal, tensor or sequence
  parallelism, 4-bit); the flag is listed, and any value but its default stops the run at
  start-up with one line saying why, before any model is loaded.

`parse_config(cls, argv, prog, description)` builds the parser from the config class's fields,
parses, applies the refusals and the checks that need several flags, and returns the config.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import torch

from eeyore.model.fastpath import triton_kernels

from .config import PROJECTIONS, ALL_LINEAR, from_namespace
from .packing import flash_attn_warning

# Flags with no switch of their own here: (type, default, what happens instead).
MAPPED: dict[str, tuple[type, Any, str]] = {
    "--flash_attn": (bool, False, "mapped: packed rows (--packing_samples) on CUDA run flash-attn's variable-length kernel whenever flash-attn is installed, padded rows PyTorch's fused attention (its own flash kernel on CUDA); warns when flash-attn cannot run"),
    "--overlap_comm": (bool, False, "mapped: FSDP2 always overlaps the gradient reduce-scatter with backward"),
    "--use_ds_universal_ckpt": (bool, False, "mapped: checkpoints are torch.distributed.checkpoint files, which any world size can load"),
    "--disable_fast_tokenizer": (bool, False, "mapped: accepted; there is one tokenizer implementation (the `tokenizers` library's)"),
    "--gradient_checkpointing_use_reentrant": (bool, False, "mapped: recomputation uses torch's non-reentrant checkpoint, which gives the same gradients"),
    "--local_rank": (int, -1, "mapped: accepted so the deepspeed launcher works; the device comes from LOCAL_RANK, which this sets when the environment lacks it"),
}

# Flags whose feature does not exist here: (type, default, why). Values in ALLOWED also pass.
REFUSED: dict[str, tuple[type, Any, str]] = {
    "--load_in_4bit": (bool, False, "4-bit (QLoRA) bases need bitsandbytes' CUDA kernels, which this project does not use; LoRA on a --bf16 base is the nearest"),
    "--zpg": (int, 1, "ZeRO++ hierarchical partitioning is DeepSpeed-internal; FSDP2 shards over one data-parallel group"),
    "--grad_accum_dtype": (str, None, "gradients always accumulate and are reduced in fp32"),
    "--ds_tensor_parallel_size": (int, 1, "tensor parallelism is not implemented; FSDP2 shards data-parallel only"),
    "--aux_loss_coef": (float, 0.0, "it weighs the load-balancing loss of mixture-of-experts models, and Llama is dense"),
    "--ring_attn_size": (int, 1, "ring attention (sequence parallelism) is not implemented; for long sequences use --gradient_checkpointing and a smaller --micro_train_batch_size"),
    "--ring_head_stride": (int, 1, "it only tunes ring attention, which is not implemented"),
    "--use_ms": (bool, False, "ModelScope downloads: this project reads local files and the local HF cache only"),
}
ALLOWED = {"--grad_accum_dtype": {"fp32", "float32"}}


def refuse(prog: str, flag: str, why: str) -> None:
    """Stop at start-up with one line (no usage block, no traceback)."""
    raise SystemExit(f"{prog}: error: {flag}: {why}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = dict(meta["argparse"])
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif "type" not in kwargs:
            kwargs["type"] = type(default) if isinstance(default, (int, float)) else str
        groups[meta["group"]].add_argument(f"--{f.name}", default=default, help=meta["help"], **kwargs)
    g = parser.add_argument_group("OpenRLHF flags without a switch here", "accepted so OpenRLHF command lines run unchanged")
    for name, (kind, default, why) in MAPPED.items():
        _add(g, name, kind, default, why)
    for name, (kind, default, why) in REFUSED.items():
        _add(g, name, kind, default, f"refused unless left at its default: {why}")
    return parser


def _add(group: Any, name: str, kind: type, default: Any, help: str) -> None:
    if kind is bool:
        group.add_argument(name, action="store_true", help=help)
    else:
        group.add_argument(name, type=kind, default=default, help=help)


def parse_config(cls: type, argv: Sequence[str] | None, prog: str, description: str) -> Any:
    """Parse `argv` into a `cls` config; a refused flag or inconsistent flags end the run in one line."""
    ns = build_parser(cls, prog, description).parse_args(argv)
    for name, (_, default, why) in REFUSED.items():
        value = getattr(ns, name[2:])
        if value != default and value not in ALLOWED.get(name, ()):
            refuse(prog, f"{name} {value}" if not isinstance(value, bool) else name, why)
    if ns.local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(ns.local_rank)
    cfg = from_namespace(cls, ns)
    cfg.adam_betas = tuple(cfg.adam_betas)
    if cfg.train_split is not None:
        cfg.dataset_split = cfg.train_split
    if cfg.use_liger_kernel:
        cfg.kernels = "on"
    if ns.flash_attn and os.environ.get("RANK", "0") == "0":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        note = flash_attn_warning(device, cfg.packing_samples)
        if note:
            print(f"warning: {note}")
    check(cfg, prog)
    return cfg


def check(cfg: Any, prog: str) -> None:
    """The checks that involve several flags or a flag's format."""
    datasets = cfg.dataset.split(",")
    if cfg.dataset_probs is not None:
        try:
            probs = [float(p) for p in cfg.dataset_probs.split(",")]
        except ValueError:
            refuse(prog, f"--dataset_probs {cfg.dataset_probs}", "expected comma-separated numbers")
        if len(probs) != len(datasets) or min(probs) < 0 or sum(probs) <= 0:
            refuse(prog, f"--dataset_probs {cfg.dataset_probs}", f"needs one non-negative probability per --dataset entry ({len(datasets)}), not all zero")
    if cfg.input_template is not None and "{}" not in cfg.input_template:
        refuse(prog, f"--input_template {cfg.input_template!r}", "must contain {} where the prompt goes")
    unknown = [m for m in cfg.target_modules if m not in (*PROJECTIONS, ALL_LINEAR)]
    if unknown or not cfg.target_modules:
        refuse(prog, f"--target_modules {' '.join(cfg.target_modules)}", f"choose from {', '.join(PROJECTIONS)} or {ALL_LINEAR}")
    if cfg.lora_rank < 0 or (cfg.lora and not 0 <= cfg.lora_dropout < 1):
        refuse(prog, "--lora_rank/--lora_dropout", "the rank must be >= 0 and the dropout in [0, 1)")
    if cfg.use_tensorboard and importlib.util.find_spec("tensorboard") is None:
        refuse(prog, "--use_tensorboard", "needs the tensorboard package (pip install tensorboard)")
    if cfg.kernels == "on" and triton_kernels() is None:
        refuse(prog, "--kernels on" if not cfg.use_liger_kernel else "--use_liger_kernel", "the Triton kernels need triton: pip install triton")
