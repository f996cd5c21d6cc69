"""Cross-entropy of `hidden @ weight.T` without the [N, V] logits.

The rows are taken a slice at a time: the slice's logits come from one matrix product, a Triton
kernel turns each logits row into its loss and, in the same buffer, its gradient
(softmax - onehot(target)) * scale, and two more products give the slice's share of the hidden
and weight gradients. Only one [rows, V] block is alive at a time, and backward has nothing to
recompute: it scales the gradients made in forward by the upstream gradient.

Rows whose target is `ignore_index` are dropped before the product (their gradient is zero).
`reduction="mean"` divides by the number of targets (1 when there are none, so an all-ignored
batch gives 0, not NaN).

Memory: the weight gradient accumulates in the weight's own dtype, slice by slice, through
`addmm_` (each slice's product is formed in fp32 inside the matrix multiply and rounded once
as it is added), so besides the two gradients only one slice of logits is ever allocated. An fp32
[V, H] accumulator would hold 2 GiB at 128256 x 4096, twice the bf16 gradient itself; rounding
once per slice instead costs about one bf16 rounding per slice, and the slices are large (at
V = 128256 in bf16, 1024 rows: four slices for 4096 tokens) so there are few of them.
"""
from __future__ import annotations

import torch

from . import _triton
from ._triton import jit, tl

BLOCK_V = 1024
_SLICE_BYTES = 256 * 2**20  # logits per slice; at V = 128256 in bf16, 1024 rows


@jit
def _cross_entropy_rows(logits_ptr, targets_ptr, loss_ptr, stride, V, scale, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Loss of one logits row; with WRITE_GRAD its gradient replaces the row."""
    row = tl.program_id(0)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK)
    peak = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK):  # online softmax statistics: running max and rescaled sum
        x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        new_peak = tl.maximum(peak, tl.max(x, axis=0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(x - new_peak), axis=0)
        peak = new_peak
    lse = peak + tl.log(total)
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - target_logit)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=cols < V)


def _slice_rows(vocab: int, itemsize: int) -> int:
    return max(16, _SLICE_BYTES // (vocab * itemsize))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep = (targets != ignore_index).nonzero().squeeze(1)
        count = keep.numel()
        scale = 1.0 / max(count, 1) if mean else 1.0
        grad_h = torch.zeros_like(hidden) if need_h else None  # ignored rows keep their zero
        grad_w = torch.zeros_like(weight) if need_w else None
        losses = _triton.empty((count,), torch.float32, hidden.device)
        rows = _slice_rows(weight.shape[0], weight.element_size())
        for start in range(0, count, rows):
            idx = keep[start : start + rows]
            h = hidden.index_select(0, idx)
            logits = h @ weight.t()
            _cross_entropy_rows[(idx.numel(),)](
                logits, targets.index_select(0, idx).contiguous(), losses[start:], logits.stride(0),
                weight.shape[0], scale, WRITE_GRAD=need_h or need_w, BLOCK=BLOCK_V,
            )
            if need_h:
                grad_h.index_copy_(0, idx, logits @ weight)
            if need_w:
                grad_w.addmm_(logits.t(), h)
            del logits  # before the next slice's product: never two [rows, V] blocks at once
        ctx.grads = (grad_h, grad_w)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not hasattr(ctx, "grads"):
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported")
        grad_h, grad_w = ctx.grads
        del ctx.grads  # handed over without a copy, so scaling in place is safe
        grad_h = None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "sum",
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index, reduction)` for hidden [N, H],
    weight [V, H], targets [N], as an fp32 scalar; gradients for hidden and weight."""
    _triton.require(hidden)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'mean', not {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} [N, H], weight {tuple(weight.shape)} [V, H] "
            f"and targets {tuple(targets.shape)} [N] do not fit"
        )
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction == "mean")
