"""Peak memory of the training loss's forward + backward: eager against the two fused versions.

    python bench/loss_memory.py [--tokens 512 --vocab 16032 --hidden 512 --dtype bfloat16]

Sides (each `sum` of the NLL of `hidden [N, H] @ weight.T [V, H]`, gradients for both):
  eager    `kernels.reference.linear_cross_entropy`: the full fp32 logits and their log-softmax
  chunked  `eeyore.train.loss.cross_entropy_sum` with the kernels off (the CPU training loss)
  triton   `kernels.linear_cross_entropy` (Triton's interpreter on CPU: slow, but the memory the
           GPU allocator would see is the same: the interpreter's own numpy arrays are not counted)

On CPU the peak comes from the profiler's allocator events, on CUDA from the allocator's own
statistics. Every memory term of these losses is proportional to N x V or to V x H, so a
scaled-down shape with the slice sizes scaled by the same factor (printed) gives the ratios of
the full shape; the default is the goal's 4096 x 128256 x 4096 divided by 8 in each dimension.
"Beyond gradients" subtracts the two gradients every side must return (grad_weight is V x H in
the weight's dtype: at the full bf16 shape 1 GiB of eager's peak).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402  (first: it turns on Triton's interpreter when there is no GPU)
from eeyore.train import loss  # noqa: E402
from kernels import reference  # noqa: E402

fused_module = importlib.import_module("kernels.linear_cross_entropy")  # the module, not the function
GOAL = (4096, 128256)  # N x V of the goal "fused loss peak <= 10 % of eager"


def peak_bytes(fn) -> int:
    """Highest bytes allocated while `fn()` runs, above what was allocated before."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    # The allocator's running total also counts what was allocated under an earlier profile and
    # freed unseen after it: measure from the total just before this run's first event.
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


def sides(targets: torch.Tensor) -> dict:
    def chunked(h, w):
        loss.use_kernels("off")
        return loss.cross_entropy_sum(h, w, targets)[0]

    return {"eager": lambda h, w: reference.linear_cross_entropy(h, w, targets),
            "chunked": chunked,
            "triton": lambda h, w: kernels.linear_cross_entropy(h, w, targets)}


def measure(fn, hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    grads = {}

    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        fn(h, w).backward()
        grads["bytes"] = sum(g.numel() * g.element_size() for g in (h.grad, w.grad))
        grads["values"] = (h.grad, w.grad)

    peak = peak_bytes(run)
    return {"peak_bytes": peak, "gradient_bytes": grads["bytes"], "beyond_gradients_bytes": peak - grads["bytes"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="rows N (default %(default)s)")
    parser.add_argument("--vocab", type=int, default=16032, help="vocabulary V (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="inputs' dtype (default %(default)s)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    scale = args.tokens * args.vocab / (GOAL[0] * GOAL[1])
    fused_module._SLICE_BYTES = int(fused_module._SLICE_BYTES * scale)  # same slices per row count as the goal's
    loss._BLOCK_BYTES = int(loss._BLOCK_BYTES * scale)
    hidden = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    print(f"{device}, {args.dtype}, N={args.tokens} V={args.vocab} H={args.hidden} (slice budgets x{scale:.4f})")
    rows = {name: measure(fn, hidden, weight) for name, fn in sides(targets).items()}
    eager = rows["eager"]
    print("| side | peak MiB | beyond gradients MiB | peak / eager | beyond gradients / eager's |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_bytes'] / 2**20:.1f} | {r['beyond_gradients_bytes'] / 2**20:.1f} | "
              f"{r['peak_bytes'] / eager['peak_bytes']:.1%} | {r['beyond_gradients_bytes'] / eager['beyond_gradients_bytes']:.1%} |")


if __name__ == "__main__":
    main()
