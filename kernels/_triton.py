"""What every kernel shares: the optional triton import, the interpreter default, output buffers.

triton is optional (`pip install triton`, or the `gpu` extra). Without it `import kernels` still
works and calling a kernel raises `KernelsUnavailable` with the install command.

Triton decides between compiling a kernel and interpreting it in Python (`TRITON_INTERPRET=1`)
when the kernel is defined, that is when this package is imported. On a machine without CUDA
the compiled path cannot run, so the interpreter becomes the default there: the same kernels then
run on CPU tensors (slowly: it is how CI checks them, not a fast path).
"""
from __future__ import annotations

import os
import sys
import types

import torch

# The interpreter must be on before triton is first imported (triton.language reads it then):
# when someone imported triton earlier without it, CPU calls cannot work and say so (`require`).
_IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are then defined as plain functions and never launched
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

AVAILABLE = triton is not None


class KernelsUnavailable(RuntimeError):
    pass


def require(x: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on `x`'s device."""
    if triton is None:
        raise KernelsUnavailable("kernels: triton is not installed; run `pip install triton` (or the [gpu] extra)")
    if x.device.type == "cpu" and (_IMPORTED_TOO_EARLY or os.environ.get("TRITON_INTERPRET") != "1"):
        raise KernelsUnavailable(
            "kernels: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first imported "
            "(importing `kernels` first does it when there is no GPU)"
        )


def jit(fn):
    """`triton.jit`, or the function unchanged when triton is missing (so the module imports)."""
    return fn if triton is None else triton.jit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def warps(block: int) -> int:
    """Warps for a program whose tile has `block` elements: one per 256, 1 to 16 (a 4096-wide row gets 16)."""
    return max(1, min(16, block // 256))


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Buffer a kernel writes completely. Tests replace it with a NaN-filled one to catch gaps."""
    return torch.empty(shape, dtype=dtype, device=device)
