"""The GPU suite's measuring tools and its kernel sections: the copy bandwidth, each Triton kernel
against its fp32 reference, and each kernel's speed and memory against eager and torch.compile.
`gpu_suite.py` runs them; see its docstring."""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Shapes:
    tokens: int  # rows of the RMSNorm and SwiGLU inputs
    hidden: int
    intermediate: int
    vocab: int
    ce_tokens: int  # rows of the cross-entropy
    batch: int  # RoPE's q/k [batch, heads, seq, head_dim]
    heads: int
    kv_heads: int
    head_dim: int
    seq: int


GPU_SHAPES = Shapes(8192, 4096, 14336, 128256, 4096, 4, 32, 8, 128, 2048)  # Llama-3.1-8B's
CPU_SHAPES = Shapes(37, 48, 80, 300, 21, 2, 4, 2, 16, 9)  # none a multiple of a block


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        cuda_sync()
        start = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replayed(fn, ctx: argparse.Namespace, calls: int = 20) -> float:
    """Median seconds per call of `fn()` replayed from one CUDA graph of `calls` calls: the
    kernels' own time. Timed from the host, a call of 0.1 ms is mostly its launch (Triton's
    Python launcher alone takes tens of microseconds), which says nothing of the kernel."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: first calls compile and allocate
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:  # something in `fn` cannot be captured (a host sync): time it from the host
        return timed(fn, ctx.warmup, ctx.repeats)
    return timed(graph.replay, ctx.warmup, ctx.repeats) / calls


def peak_bytes(fn) -> int | None:
    """Device memory allocated by `fn()` at its highest point, above what was allocated before."""
    if not torch.cuda.is_available():
        return None
    cuda_sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    cuda_sync()
    return torch.cuda.max_memory_allocated() - start


# ----------------------------------------------------------------------------------- bandwidth


def bandwidth(ctx: argparse.Namespace) -> dict:
    """Bytes read + written per second by a device-to-device copy of a large buffer."""
    size = (2 << 30) if ctx.cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), warmup=3, repeats=10)
    return {"bytes_per_s": 2 * size / seconds, "buffer_bytes": size}


# ------------------------------------------------------------------------------------- kernels


def kernel_cases(s: Shapes, dtype: torch.dtype, device: torch.device, ignored: float = 0.1) -> dict[str, tuple]:
    """name -> (kernel, reference, differentiable inputs, other inputs, forward bytes moved).

    `ignored`: the fraction of cross-entropy targets set to the ignored id (the correctness rows
    check they get no gradient; the speed rows use none, so the fused loss computes the goal's
    full 4096 x 128256 like eager does)."""
    import kernels
    from kernels import reference

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    angles = torch.randn(1, 1, s.seq, s.head_dim // 2, device=device)
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    targets = torch.randint(0, s.vocab, (s.ce_tokens,), device=device)
    targets[torch.rand(s.ce_tokens, device=device) < ignored] = -100
    size = torch.tensor([], dtype=dtype).element_size()
    q, k = rnd(s.batch, s.heads, s.seq, s.head_dim), rnd(s.batch, s.kv_heads, s.seq, s.head_dim)
    return {
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5),
                     [rnd(s.tokens, s.hidden), rnd(s.hidden)], [], 2 * s.tokens * s.hidden * size),
        "apply_rope": (lambda q, k: kernels.apply_rope(q, k, cos, sin), lambda q, k: reference.apply_rope(q, k, cos, sin),
                       [q, k], [], 2 * (q.numel() + k.numel()) * size),
        "swiglu": (kernels.swiglu, reference.swiglu, [rnd(s.tokens, s.intermediate), rnd(s.tokens, s.intermediate)], [],
                   3 * s.tokens * s.intermediate * size),
        "linear_cross_entropy": (
            lambda h, w: kernels.linear_cross_entropy(h, w, targets, reduction="mean"),
            lambda h, w: reference.linear_cross_entropy(h, w, targets, reduction="mean"),
            [rnd(s.ce_tokens, s.hidden), rnd(s.vocab, s.hidden, scale=0.02)], [], None),
    }


def forward_backward(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor] | None = None):
    """Outputs and input gradients of sum(out * upstream); fresh leaves so calls never share grads."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    upstream = upstream or [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grad_tensors=upstream)
    return [o.detach() for o in outs] + [x.grad for x in leaves], upstream


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp(min=1e-30))


def kernel_correctness(ctx: argparse.Namespace) -> dict:
    rows = {}
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        if dtype == torch.bfloat16 and not ctx.cuda:
            continue  # Triton's interpreter computes through numpy, which has no bf16
        for name, (kernel, ref, inputs, _, _) in kernel_cases(ctx.shapes, dtype, ctx.device).items():
            got, up = forward_backward(kernel, inputs)
            truth, _ = forward_backward(ref, [x.float() for x in inputs], [u.float() for u in up])
            err = max(relative_error(a, b) for a, b in zip(got, truth))
            rows[f"{name} {str(dtype)[6:]}"] = {"max_relative_error": err, "tolerance": tol, "passed": err <= tol}
        err = cached_attention_error(ctx.shapes, dtype, ctx.device)
        rows[f"cached_attention {str(dtype)[6:]}"] = {"max_relative_error": err, "tolerance": tol, "passed": err <= tol}
    return rows


def cached_attention_error(s: Shapes, dtype: torch.dtype, device: torch.device) -> float:
    """The decode/chunk attention (inference only: no gradient) against SDPA with the mask, in fp32:
    a chunk of 3 queries per row, rows ending at different positions of the cache."""
    import torch.nn.functional as F

    import kernels

    q = torch.randn(s.batch, s.heads, 3, s.head_dim, device=device)
    k, v = (torch.randn(s.batch, s.kv_heads, s.seq, s.head_dim, device=device) for _ in range(2))
    ends = torch.randint(2, s.seq, (s.batch, 1), device=device)
    positions = ends - 2 + torch.arange(3, device=device)
    mask = (torch.arange(s.seq, device=device) <= positions[:, :, None])[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return relative_error(kernels.cached_attention(q.to(dtype), k.to(dtype), v.to(dtype), positions), expected)


def kernel_speed(ctx: argparse.Namespace, bytes_per_s: float | None) -> dict:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    backend = "inductor" if ctx.cuda else "eager"  # the dry run only traces: no C++ build on the CPU
    rows = {}
    for name, (kernel, ref, inputs, _, fwd_bytes) in kernel_cases(ctx.shapes, dtype, ctx.device, ignored=0.0).items():
        compiled = torch.compile(ref, backend=backend)
        row = {"gradient_bytes": sum(x.numel() * x.element_size() for x in inputs)}  # every side returns these
        for side, fn in (("triton", kernel), ("eager", ref), ("compile", compiled)):
            up = forward_backward(fn, inputs)[1]
            row[f"{side}_s"] = timed(lambda: forward_backward(fn, inputs, up), ctx.warmup, ctx.repeats)
            row[f"{side}_peak_bytes"] = peak_bytes(lambda: forward_backward(fn, inputs, up))
            if fwd_bytes and bytes_per_s:
                with torch.no_grad():
                    seconds = replayed(lambda: fn(*inputs), ctx) if ctx.cuda else timed(lambda: fn(*inputs), ctx.warmup, ctx.repeats)
                row[f"{side}_forward_bandwidth_fraction"] = fwd_bytes / seconds / bytes_per_s
        rows[name] = row
    return rows


# -------------------------------------------------------------------------------------- models
