"""SwiGLU's gate: silu(gate) * up, elementwise, in one pass (eager runs three kernels).

    y = g * sigmoid(g) * u
    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   du = dy * g * sigmoid(g)
Math in fp32, results cast to the input dtype.
"""
from __future__ import annotations

import torch

from . import _triton
from ._triton import jit, tl

BLOCK = 1024


@jit
def _forward(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _backward(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = _triton.empty(gate.shape, gate.dtype, gate.device)
        if gate.numel():
            _forward[_grid(gate.numel())](gate, up, y, gate.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = _triton.empty(gate.shape, gate.dtype, gate.device)
        du = _triton.empty(up.shape, up.dtype, up.device)
        if gate.numel():
            _backward[_grid(gate.numel())](dy, gate, up, dg, du, gate.numel(), BLOCK=BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up`."""
    _triton.require(gate)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    return SwiGLUFunction.apply(gate, up)
