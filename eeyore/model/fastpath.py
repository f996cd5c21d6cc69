"""Faster variants of the readable model's parts, swapped in from outside by one function.

`eeyore/model/llama.py` is the plain algorithm: `nn.Linear`, the RMSNorm, RoPE and attention a
reader can follow. `speed_up(model, kernels=..., cpu_matmul=...)` changes how those parts compute,
never what: each module keeps its parameters and names (checkpoints, FSDP and optimisers see the
same model) and only its class is swapped for a subclass that overrides `forward` (or the
attention's `rope` / `attend`), as gpt-fast swaps modules for its quantised ones.

- CPU products (`cpu_matmul`; fp32, and bf16 for inference): every `nn.Linear` computes through
  `linear.linear`, whose product per row class is measured on this machine for the model's
  weight shapes (see `linear.py`); for inference the weights may be replaced by packed copies.
- Attention over the KV cache (always): the query heads that share a key/value head are folded
  into that head's query rows, so one SDPA call reads each cached key once (`CacheAttention`).
- Kernels (`kernels`, CUDA): RMSNorm, RoPE and SwiGLU through the Triton kernels of the top-level
  `kernels` package; attention over the KV cache by each query's position, never a mask (the
  Triton `cached_attention`, or flash-attn for a decode step when it imports); packed training
  rows through flash-attn's variable-length kernel when it imports.
  `auto` turns them on for a CUDA model when triton imports, off otherwise.
"""
from __future__ import annotations

import functools
import importlib
import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import linear as products
from .llama import MLP, Attention, Context, Llama, RMSNorm

KERNEL_MODES = ("auto", "on", "off")
CPU_MATMUL_MODES = ("auto", *products.PRODUCTS)
log = logging.getLogger("eeyore.model.fastpath")


def add_arguments(parser: Any, style: str = "-") -> None:
    """The two switches, for the server (--cpu-matmul; its help states defaults) and the trainers
    (`style="_"`: --cpu_matmul; their help formatter appends defaults itself)."""
    default = " (default %(default)s)" if style == "-" else ""
    parser.add_argument("--kernels", choices=KERNEL_MODES, default="auto",
                        help="Triton kernels (RMSNorm, RoPE, SwiGLU, attention over the KV cache; flash-attn for "
                             "packed rows and decode when installed): auto = on for a CUDA model when triton imports, "
                             "off on CPU" + default)
    parser.add_argument(f"--cpu{style}matmul", choices=CPU_MATMUL_MODES, default="auto",
                        help="product for CPU projections in fp32 or bf16: auto = the fastest measured at "
                             "start on this machine for the model's shapes; blas = F.linear; onednn = oneDNN "
                             "on the plain weights; packed = oneDNN on packed copies (inference only)" + default)


def speed_up(model: Llama, kernels: str = "auto", cpu_matmul: str = "auto", inference: bool = False,
             may_pack: bool = True) -> dict[str, Any]:
    """Swap the faster variants into `model` in place; returns (and logs) what was chosen.

    `inference` allows replacing weights by inference-only copies (no gradient, no saving) unless
    `may_pack` is False (a model that will be compiled).
    """
    if kernels not in KERNEL_MODES:
        raise ValueError(f"--kernels {kernels}: use one of {', '.join(KERNEL_MODES)}")
    param = next(model.parameters())
    summary: dict[str, Any] = {"kernels": _use_kernels(kernels, param.device)}
    if summary["kernels"]:
        swap_kernel_modules(model)
    else:
        _swap(model, Attention, CacheAttention)
    if param.device.type == "cpu" and products.chooses_for(param.dtype, inference):
        summary["cpu_matmul"] = _swap_linears(model, cpu_matmul, inference, may_pack)
    elif param.device.type == "cpu" and cpu_matmul != "auto":
        log.warning("--cpu-matmul %s has no effect on a %s model: F.linear computes its products "
                    "(the choice is made for fp32, and for bf16 inference)", cpu_matmul, products.dtype_name(param.dtype))
    log.info("fast path: %s", summary)
    return summary


# ---------------------------------------------------------------------- CPU products

class ChosenLinear(nn.Linear):
    """`nn.Linear` (no bias) through the product `linear.py` chose for the input's row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return products.linear(x, self.weight)


def _swap_linears(model: nn.Module, forced: str, inference: bool, may_pack: bool) -> dict[str, str]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    shapes = Counter(tuple(m.weight.shape) for m in linears)
    dtype = linears[0].weight.dtype
    choice = products.choose([(count, n, k) for (n, k), count in shapes.items()], forced, inference, may_pack, dtype)
    for m in linears:
        m.__class__ = ChosenLinear
    if choice["few"] == "packed":  # inference only (`choose` refuses it otherwise)
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for m in linears:
            # A tied lm_head keeps the embedding's table: a packed copy would double its memory
            # and its read per step; it takes the best plain-weight product instead.
            if id(m.weight) not in tied and products.packable(m.weight):
                packed = products.pack_weight(m.weight)
                del m.weight  # the parameter goes; a plain tensor attribute takes its name
                m.weight = packed
    return choice


# ---------------------------------------------------------------------- attention over the cache

class CacheAttention(Attention):
    """Grouped-query attention over the KV cache that reads each cached key and value once.

    With a mask, SDPA's `enable_gqa` has every query head read its key/value head on its own:
    each cached entry is read heads // kv_heads times (3 for SmolLM2, 4 for Llama-3.1-8B), and
    at 16 rows of a few hundred tokens that reading costs a quarter of a CPU decode step. Query
    head h uses key/value head h // group, so the heads of one group are folded into that
    head's query rows and one plain SDPA call reads the entries once. Without a cache (training,
    plain causal attention) nothing changes.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        group = self.heads // self.kv_heads
        if ctx.cache is None or group == 1 or ctx.mask is None:
            return super().attend(q, k, v, ctx)
        b, _, t, dim = q.shape
        rows = q.reshape(b, self.kv_heads, group * t, dim)  # row (j, g, t) = head j * group + g, query t
        mask = ctx.shared("folded mask", lambda: _folded(ctx.mask, group, q.dtype))
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).view(b, self.heads, t, dim)


def _folded(mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask `[B, 1, T, L]` for the folded query rows `[B, 1, group * T, L]`, as the
    additive mask (0 or -inf, in the queries' dtype) SDPA would otherwise rebuild in every layer."""
    b, _, t, length = mask.shape
    rows = mask[:, :, None].expand(b, 1, group, t, length).reshape(b, 1, group * t, length)
    return torch.zeros(rows.shape, dtype=dtype, device=mask.device).masked_fill_(~rows, float("-inf"))


def _swap(model: nn.Module, plain: type, fast: type) -> None:
    for m in model.modules():
        if type(m) is plain:
            m.__class__ = fast


# ---------------------------------------------------------------------- kernels

def triton_kernels() -> Any | None:
    """The `kernels` package when it and triton import (any failure: None, kernels stay off)."""
    try:
        import triton  # noqa: F401
        return importlib.import_module("kernels")
    except Exception:  # a missing or broken triton install
        return None


def _use_kernels(mode: str, device: torch.device) -> bool:
    if mode == "off":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_kernels() is not None
    if triton_kernels() is None:
        raise ValueError("--kernels on: the Triton kernels need triton; pip install triton (or use --kernels off)")
    return True


def _kernel(name: str):
    return getattr(importlib.import_module("kernels"), name)


# Under torch.compile (the compiled decode step, a block under the trainers' --deepcompile) each
# kernel module runs the plain code instead: the compiler fuses the norm, RoPE and SwiGLU into
# kernels of its own, and a call into ours would split its graph at every layer (each piece
# then compiled again per layer, over the compiler's recompile limit, and no CUDA graph of the
# whole step).
_compiling = torch.compiler.is_compiling


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return super().forward(x)
        return _kernel("rms_norm")(x, self.weight, self.eps)


class KernelMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return super().forward(x)
        return self.down_proj(_kernel("swiglu")(self.gate_proj(x), self.up_proj(x)))


class KernelAttention(CacheAttention):
    def rope(self, q, k, cos, sin):
        if _compiling():
            return super().rope(q, k, cos, sin)
        return _kernel("apply_rope")(q, k, cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        if _compiling():
            return super().attend(q, k, v, ctx)
        if ctx.cache is not None and _on_gpu(q):
            return _cached(q, k, v, ctx)
        flash = _flash_attn()
        if ctx.cu_seqlens is not None and flash is not None and _on_gpu(q) and q.dtype in HALF:
            return _flash_packed(flash, q, k, v, ctx.cu_seqlens)
        return super().attend(q, k, v, ctx)  # plain causal: SDPA picks its flash kernel itself


HALF = (torch.float16, torch.bfloat16)


def _on_gpu(q: torch.Tensor) -> bool:
    """Where the attention kernels run (the CPU tests route their interpreter runs through here)."""
    return q.is_cuda


def _cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Decode and chunked prefill over the cache, by each query's position rather than a mask.

    A decode step (one query per row) goes to flash-attn's `flash_attn_with_kvcache` when it is
    installed: its per-row lengths are then exact (positions + 1). A chunk goes to the Triton
    `cached_attention` even then, because flash-attn aligns a chunk's queries to the row's last
    position and a padded prefill clamps its padding's positions to the cache's end, which would
    shift the real queries; the Triton kernel takes each query's own position.
    """
    flash = _flash_attn()
    if flash is not None and q.shape[2] == 1 and q.dtype in HALF:
        return _flash_cached(flash, q, k, v, ctx)
    return _kernel("cached_attention")(q, k, v, ctx.positions)

def swap_kernel_modules(model: nn.Module) -> None:
    for plain, fast in ((RMSNorm, KernelRMSNorm), (MLP, KernelMLP), (Attention, KernelAttention)):
        _swap(model, plain, fast)


@functools.cache  # looked up once: a failed import is not cached by Python and costs ~70 µs per layer per step
def _flash_attn() -> Any | None:
    try:
        return importlib.import_module("flash_attn")
    except Exception:  # optional CUDA-only build
        return None


def _flash_packed(flash: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequences packed into one row through flash-attn's variable-length kernel: no mask."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    out = flash.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                       cu, cu, longest, longest, causal=True)
    return out.transpose(0, 1)[None]


def _flash_cached(flash: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    """A decode step over the cache by per-row lengths: row b reads its first positions[b, 0] + 1 keys."""
    lengths = (ctx.positions[:, -1] + 1).to(torch.int32)
    # [B, heads, L, D] -> [B, L, heads, D] views: flash-attn takes any strides but the last.
    out = flash.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        cache_seqlens=lengths, causal=True)
    return out.transpose(1, 2)
