"""The GPU path measured in one command, in about 4 minutes on one H200 (`--server-compile` adds a
few: the server then compiles every batch bucket at start):

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
                (CUDA graphs): step times, compile time, the first step's logits and greedy agreement

Writes `<out>/gpu_suite.json` and `<out>/gpu_suite.md` (a section ready for BENCHMARKS.md) and prints
the markdown. Without CUDA (and without --dry-run-cpu) it prints one line and exits with status 2.

The kernel sections are in `gpu_kernels.py`, the model sections in `gpu_models.py`, the report in
`gpu_report.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repository's packages, and its bench/ scripts
sys.path.insert(0, str(REPO / "bench"))

import gpu_kernels  # noqa: E402
import gpu_models  # noqa: E402
from gpu_report import markdown, write_atomic  # noqa: E402

NO_GPU = 2  # exit status without CUDA
SECTIONS = {  # name -> (function, whether it takes the measured copy bandwidth); run in this order
    "bandwidth": (gpu_kernels.bandwidth, False),
    "kernels": (gpu_kernels.kernel_correctness, False),
    "kernel_speed": (gpu_kernels.kernel_speed, True),
    "parity": (gpu_models.parity, False),
    "sft": (gpu_models.sft, False),
    "decode": (gpu_models.decode, True),
    "server": (gpu_models.server, False),
    "compiled_decode": (gpu_models.compiled_decode, True),
}


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cuda = torch.cuda.is_available() and not args.dry_run_cpu
    if not args.cuda and not args.dry_run_cpu:
        print("gpu_suite: no CUDA device here; this suite measures the GPU path (--dry-run-cpu exercises it on tiny CPU shapes)",
              file=sys.stderr)
        return NO_GPU
    args.device = torch.device("cuda" if args.cuda else "cpu")
    args.shapes = gpu_kernels.GPU_SHAPES if args.cuda else gpu_kernels.CPU_SHAPES
    args.warmup, args.repeats = (3, 10) if args.cuda else (1, 1)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # the server's process
    start = time.perf_counter()
    results: dict = {"environment": environment(args), "command": " ".join(["python bench/gpu_suite.py", *(argv or sys.argv[1:])])}
    try:
        for name in args.only:
            fn, takes_bandwidth = SECTIONS[name]
            extra = (results.get("bandwidth", {}).get("bytes_per_s"),) if takes_bandwidth else ()
            run_section(results, name, fn, args, *extra)
            if args.cuda:
                torch.cuda.empty_cache()
            text = write_results(args.out, results, start)  # after every section: a run cut short keeps what it measured
    except KeyboardInterrupt:
        print(f"gpu_suite: interrupted; the sections finished before are in {args.out / 'gpu_suite.json'}", file=sys.stderr)
        return 130
    finally:
        from eeyore.train.parallel import close_distributed

        close_distributed()  # the SFT section's world of one
    print(text)
    failed = [k for k, v in results.items() if isinstance(v, dict) and ("error" in v or any(
        isinstance(row, dict) and row.get("passed") is False for row in v.values()))]
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="folder of gpu_suite.json and gpu_suite.md (default: bench/results)")
    parser.add_argument("--dry-run-cpu", action="store_true", help="run every section on the CPU with tiny shapes (no figures worth keeping)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run these sections only, in the suite's order (default: all of them)")
    parser.add_argument("--decode-layers", type=int, default=None,
                        help="layers of the 8B-shaped model of decode and compiled_decode (default: all 32; the dry run uses 2)")
    parser.add_argument("--server-model", default=None, help="checkpoint the server section serves (default: the embedded model)")
    parser.add_argument("--server-random-weights", action="store_true",
                        help="serve random weights in the shape of --server-model's config.json, with its tokenizer "
                             "(for a machine that has the config and tokenizer, not the weights; default: off)")
    parser.add_argument("--server-compile", action="store_true",
                        help="start the server with --compile (its decode step compiled at start; default: eager)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder (it is created if missing)")
    args.only = [name for name in SECTIONS if name in args.only]
    return args


if __name__ == "__main__":
    sys.exit(main())
