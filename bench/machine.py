"""What machine a benchmark ran on: CPU model and vendor, the ISA flags that decide which kernels
run, torch's BLAS and oneDNN builds, and the memory bandwidth a pass over a model's weights gets."""
from __future__ import annotations

import platform
import re
import time

import torch

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """One line: model name, vendor, ISA flags, cores, torch threads, BLAS and oneDNN versions."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name", platform.processor() or "unknown CPU")
    vendor = info.get("vendor_id", "unknown vendor")
    flags = [f for f in ISA_FLAGS if f in info.get("flags", "").split()]
    config = torch.__config__.show()
    libs = [m.group(0).strip() for m in re.finditer(r"(Math Kernel Library Version [^\n]*?Build \d+|MKL-DNN v[\d.]+|OpenBLAS[^\n]*)", config)]
    return (f"CPU {name} ({vendor}); ISA {' '.join(flags) or 'none listed'}; torch uses "
            f"{torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads; "
            f"{'; '.join(libs) or 'BLAS unknown'}; torch {torch.__version__}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct weights one forward pass reads (a tied table counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_pass_seconds(model: torch.nn.Module, repeats: int = 5) -> float:
    """Best time to read every weight once (a sum over each): the floor of a decode step that
    reads each weight once; bytes / this = the bandwidth a weight pass gets on this machine."""
    weights = list({id(p): p for p in model.parameters()}.values())
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                w.sum()
            best = min(best, time.perf_counter() - start)
    return best
