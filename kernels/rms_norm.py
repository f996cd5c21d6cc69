"""RMSNorm as HF's LlamaRMSNorm computes it: fp32 statistics, normalised value cast back to the
input dtype, then multiplied by the weight (in the promoted dtype of input and weight).

One program normalises one row (the whole hidden dimension fits one block). Backward treats the
cast as the identity, as autograd does for the eager module:
    n = x * rstd,  y = w * n
    dx = rstd * (dn - n * mean(dn * n)),  dn = dy * w
    dw = sum over rows of dy * n
dw is reduced in two stages: each program adds up its rows into one fp32 row of a small
[programs, H] buffer, and torch sums the buffer's rows (no atomics, deterministic).
"""
from __future__ import annotations

import torch

from . import _triton
from ._triton import jit, tl


@jit
def _forward(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # HF's cast back before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _backward(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, dy_stride, x_stride, dx_stride, rows, cols,
    programs, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, rows, programs):
        dy = tl.load(dy_ptr + row * dy_stride + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / cols))
        tl.store(dx_ptr + row * dx_stride + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * n
    tl.store(dw_ptr + pid * cols + offs, dw, mask=mask)


def _programs(rows: int, device: torch.device) -> int:
    """Programs of the backward pass: enough to fill the GPU, few enough that dw's buffer stays small."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape, cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        y = _triton.empty((rows, cols), torch.promote_types(x.dtype, weight.dtype), x.device)
        rstd = _triton.empty((rows,), torch.float32, x.device)
        block = _triton.next_power_of_2(cols)
        if rows:
            _forward[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), cols, eps, BLOCK=block, num_warps=_triton.warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        cols = x2.shape[-1]
        rows = x2.shape[0]
        dy2 = dy.reshape(-1, cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = _triton.empty((rows, cols), x2.dtype, x2.device)
        programs = _programs(rows, x2.device)
        block = _triton.next_power_of_2(cols)
        partial = _triton.empty((programs, cols), torch.float32, x2.device)
        if rows:
            _backward[(programs,)](
                dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0), rows, cols,
                programs, BLOCK=block, num_warps=_triton.warps(block),
            )
        else:
            partial.zero_()
        return dx.reshape(ctx.shape), partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)` over the last dim."""
    _triton.require(x)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight.contiguous(), eps)
