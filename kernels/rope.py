"""Split-half rotary embedding (HF's `rotate_half` convention) for q and k.

With x = [x1, x2] split along the head dimension and cos/sin laid out as [c, c] / [s, s]:
    y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2
The rotation is orthogonal, so backward applies the same formula with -sin:
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1
cos and sin come from positions and get no gradient.

One program handles one (batch, position) pair for every head at once: the [heads, D/2] tile
reads cos/sin once for all heads. q and k are read through their strides (the model hands over
transposed views) and written as new contiguous [B, heads, T, D] tensors.
"""
from __future__ import annotations

import torch

from . import _triton
from ._triton import jit, tl


@jit
def _rotate(
    x_ptr, cos_ptr, sin_ptr, y_ptr, T, heads, half,
    xs_b, xs_h, xs_t, cs_b, cs_t, ys_b, ys_h, ys_t, sign,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < half)
    c_off = b * cs_b + t * cs_t + d
    cos1 = tl.load(cos_ptr + c_off, mask=d < half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_off + half, mask=d < half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_off, mask=d < half, other=0.0).to(tl.float32) * sign
    sin2 = tl.load(sin_ptr + c_off + half, mask=d < half, other=0.0).to(tl.float32) * sign
    x_off = b * xs_b + t * xs_t + h * xs_h + d
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)
    y_off = b * ys_b + t * ys_t + h * ys_h + d
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + y_off, (x1 * cos1 - x2 * sin1).to(out_ty), mask=mask)
    tl.store(y_ptr + y_off + half, (x2 * cos2 + x1 * sin2).to(out_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, heads, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = _triton.empty((B, heads, T, D), x.dtype, x.device)
    if x.numel():
        _rotate[(B * T,)](
            x, cos, sin, y, T, heads, D // 2,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
            y.stride(0), y.stride(1), y.stride(2), sign,
            BLOCK_H=_triton.next_power_of_2(heads), BLOCK_D=_triton.next_power_of_2(D // 2),
        )
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _launch(q, cos, sin, 1.0), _launch(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dq, cos, sin, -1.0), _launch(dk, cos, sin, -1.0), None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, heads, T, D] alike")
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"apply_rope: head dim {D} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[1] != 1 or t.shape[2:] != (T, D) or t.shape[0] not in (1, B):
            raise ValueError(f"apply_rope: {name} {tuple(t.shape)} must be [B or 1, 1, {T}, {D}]")
        if t.stride(-1) != 1:
            raise ValueError(f"apply_rope: {name} must be contiguous in its last dim")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)` in one pass each."""
    _triton.require(q)
    _check(q, k, cos, sin)
    B = q.shape[0]
    cos, sin = cos.expand(B, -1, -1, -1), sin.expand(B, -1, -1, -1)  # batch stride 0 when broadcast
    return RoPEFunction.apply(q, k, cos, sin)
