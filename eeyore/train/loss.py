"""Cross-entropy over a large vocabulary without materialising the full logits.

A naive loss turns `hidden [N, H]` into fp32 logits `[N, V]`, keeps them and their log-softmax
for backward, and then builds a gradient of the same size: at N = 4096 and V = 128256 that is
three 2 GiB tensors. Here the head projection, log-softmax and NLL run over slices of rows so
only one `[rows, V]` block is ever alive, and two more savings come for free:

- rows whose target is ignored (prompts, user turns, padding) are dropped before the head
  projection, so their logits are never computed;
- for a scalar loss the gradient of each slice is computed while its logits are in hand (the
  softmax minus the one-hot target), so backward does not recompute them: the head costs the
  same three matmuls as the naive loss, minus the ignored rows.

On CUDA the summed loss is the Triton kernel `kernels.linear_cross_entropy` (same slicing, the
softmax and its gradient fused into one pass over each row; `use_kernels` selects).

`token_logprobs` is the variant for losses that weigh tokens after the fact (DPO sums log-probs
per sequence and feeds them through a sigmoid): its backward recomputes each slice, because the
per-token weights are only known then.
"""
from __future__ import annotations

import torch
from torch import Tensor

import kernels
from eeyore.model.linear import linear

IGNORE_INDEX = -100
_BLOCK_BYTES = 256 * 2**20  # fp32 logits per slice: 512 rows at V = 128256


def _rows_per_block(vocab_size: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * vocab_size))


def _flatten(hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _block_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    # The matmul runs in the parameter dtype (bf16 under mixed precision); softmax statistics in fp32.
    return linear(hidden, weight).float()


def _softmax_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax of fp32 `logits` computed in their own memory, log-sum-exp and the targets' logits.

    In place and in four plain passes (max, exp, sum, divide): on CPU several times faster than
    `logsumexp` followed by `exp`, and no second [rows, V] block is ever allocated.
    """
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    return probs.div_(norm), (norm.log() + peak).squeeze(1), target_logit


class _CrossEntropySum(torch.autograd.Function):
    """Sum of NLL over the rows `keep`; the gradients are formed in forward (see module doc)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, keep: Tensor, rows: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # in its dtype: see _backprop_block
        for start in range(0, keep.numel(), rows):
            total += _nll_block(hidden, weight, targets, keep[start : start + rows], grad_h, grad_w)
        # Kept as attributes, not saved tensors, so backward can hand them over without a copy.
        ctx.grads = (grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not hasattr(ctx, "grads"):
            raise RuntimeError("cross_entropy_sum: backward through the same loss twice is not supported")
        grads = ctx.grads
        del ctx.grads  # the gradients leave with this call: scaling them in place is safe
        if not bool(grad_out == 1):
            grads = tuple(None if g is None else g.mul_(grad_out) for g in grads)
        return (*grads, None, None, None)


def _nll_block(hidden: Tensor, weight: Tensor, targets: Tensor, idx: Tensor, grad_h: Tensor | None, grad_w: Tensor | None) -> Tensor:
    """Summed NLL of rows `idx`, adding their gradients into `grad_h` / `grad_w` when given.

    A function of its own so that its `[rows, V]` block is freed before the next one exists.
    """
    h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
    probs, lse, target_logit = _softmax_(_block_logits(h, weight), t)
    if grad_h is not None or grad_w is not None:
        probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(NLL)/d(logits)
        _backprop_block(probs, h, weight, idx, grad_h, grad_w)
    return (lse - target_logit).sum()


def _backprop_block(grad_logits: Tensor, h: Tensor, weight: Tensor, idx: Tensor, grad_h: Tensor | None, grad_w: Tensor | None) -> None:
    """grad_h[idx] = grad_logits @ W and grad_w += grad_logits.T @ h.

    grad_w is in the weight's dtype: each slice's product is summed in fp32 inside the matrix
    multiply and rounded once as it is added, so no fp32 [V, H] accumulator (2 GiB at 128256 x
    4096, twice the bf16 gradient) nor per-slice [V, H] temporary is ever allocated.
    """
    g = grad_logits.to(weight.dtype)
    if grad_h is not None:
        grad_h.index_copy_(0, idx, linear(g, weight.t()))
    if grad_w is not None:
        grad_w.addmm_(g.t(), h)


def _targeted(targets: Tensor) -> Tensor:
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


def use_kernels(mode: str) -> None:
    """Which summed loss `cross_entropy_sum` runs: "auto" (the Triton `linear_cross_entropy` for
    CUDA tensors when triton imports, this module's slices otherwise), "on" or "off"."""
    global _KERNELS
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"kernels mode must be auto, on or off, not {mode!r}")
    _KERNELS = mode


_KERNELS = "auto"


def _fused(hidden: Tensor) -> bool:
    if _KERNELS == "auto":
        return hidden.is_cuda and kernels.AVAILABLE
    return _KERNELS == "on"


def cross_entropy_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, rows_per_block: int | None = None
) -> tuple[Tensor, Tensor]:
    """Summed token NLL of `targets` under `hidden @ weight.T`, and the number of target tokens.

    hidden: [..., H] final-norm output; weight: [V, H] (the lm_head); targets: [...] token ids,
    IGNORE_INDEX where no loss is taken. Returns (fp32 scalar sum, int64 scalar count).
    """
    hidden, targets = _flatten(hidden, targets)
    if _fused(hidden):
        return kernels.linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, "sum"), (targets != IGNORE_INDEX).sum()
    keep = _targeted(targets)
    rows = rows_per_block or _rows_per_block(weight.shape[0])
    total = _CrossEntropySum.apply(hidden, weight, targets, keep, rows)
    return total, torch.tensor(keep.numel(), device=hidden.device)


class _TokenLogprobs(torch.autograd.Function):
    """log p(target) of the rows `keep` (0 elsewhere); backward recomputes each slice of logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, keep: Tensor, rows: int) -> Tensor:
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(keep.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, keep.numel(), rows):
            idx = keep[start : start + rows]
            probs, block_lse, target_logit = _softmax_(_block_logits(hidden.index_select(0, idx), weight), targets.index_select(0, idx))
            del probs  # freed before the next block exists
            lse[start : start + rows] = block_lse
            out.index_copy_(0, idx, target_logit - block_lse)
        ctx.save_for_backward(hidden, weight, targets, keep, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, keep, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for start in range(0, keep.numel(), ctx.rows):
            sl = slice(start, start + ctx.rows)
            _logprob_grad_block(hidden, weight, targets, keep[sl], lse[sl], grad_out, grad_h, grad_w)
        return grad_h, grad_w, None, None, None


def _logprob_grad_block(
    hidden: Tensor, weight: Tensor, targets: Tensor, idx: Tensor, lse: Tensor, grad_out: Tensor,
    grad_h: Tensor | None, grad_w: Tensor | None,
) -> None:
    h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
    # d(log p_t)/d(logits) = onehot(t) - softmax, times each row's upstream gradient
    probs = _block_logits(h, weight).sub_(lse[:, None]).exp_()
    probs[torch.arange(len(t), device=t.device), t] -= 1.0
    _backprop_block(probs.mul_(-grad_out.index_select(0, idx)[:, None].float()), h, weight, idx, grad_h, grad_w)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, rows_per_block: int | None = None) -> Tensor:
    """fp32 log-probability of each target token, shape of `targets`; 0 where IGNORE_INDEX.

    Differentiable with any upstream weighting (e.g. per-sequence sums for DPO).
    """
    shape = targets.shape
    hidden, targets = _flatten(hidden, targets)
    rows = rows_per_block or _rows_per_block(weight.shape[0])
    return _TokenLogprobs.apply(hidden, weight, targets, _targeted(targets), rows).reshape(shape)
