"""`x @ weight.T`, the product behind every projection, the lm_head and the training loss.

On CPU in fp32, `F.linear` calls MKL's sgemm, which on this project's CPUs (AMD with AVX-512)
runs about half as fast as oneDNN's inner product at every row count, from a one-token decode
step to a 2048-token training batch (bench/model_bench.py, BENCHMARKS.md). PyTorch's own
compiler (Inductor) calls oneDNN on CPU through `torch.ops.mkldnn._linear_pointwise`; so do we,
on the plain weight (training, any caller) or on a packed one (below). bf16 already goes through
oneDNN in `F.linear`, and CUDA keeps cuBLAS, so both take `F.linear`.

With gradients on, a small autograd function runs the two backward products through oneDNN too
(grad_x = grad @ W, grad_W = grad.T @ x).

For inference, `pack_weight` gives oneDNN's blocked layout of a weight, which a decode step reads
25-45 % faster than the plain one (`Llama.pack_for_cpu_inference`; the engine does it for the
model it loads). `linear` accepts either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN (a: [..., K], b: [N, K])."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _inner_product(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = _inner_product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_rows, x_rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = _inner_product(grad_rows.t(), x_rows.t())
        return grad_x, grad_w


PACK_ROWS_HINT = 16  # the row count oneDNN blocks the weight for; 1-512 rows all run well with it


def packable(weight: torch.Tensor) -> bool:
    return weight.layout == torch.strided and uses_onednn(weight, weight)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of an fp32 CPU weight `[N, K]`, for `linear` without gradients."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Under torch.compile, Inductor lowers F.linear to oneDNN itself and cannot lower the raw op.
    return (
        ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, through oneDNN for CPU fp32 tensors."""
    if weight.layout == torch._mkldnn:  # packed by `pack_weight`
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a weight packed for inference has no gradient: run under torch.no_grad()")
        return _inner_product(x, weight)
    if not uses_onednn(x, weight):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _OneDNNLinear.apply(x, weight)
    return _inner_product(x, weight)
