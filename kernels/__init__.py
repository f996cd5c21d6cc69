"""Triton kernels for the CUDA training and inference path: autograd functions (forward and backward),
and `cached_attention` for inference over the KV cache (forward only).

    from kernels import rms_norm, apply_rope, swiglu, linear_cross_entropy, cached_attention

Importing works without triton; calling a kernel then raises `KernelsUnavailable`. Without CUDA
the kernels run through Triton's interpreter (see `_triton.py`): correct, slow, for tests.
"""
from ._triton import AVAILABLE, KernelsUnavailable
from .cached_attention import cached_attention
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["AVAILABLE", "KernelsUnavailable", "apply_rope", "cached_attention", "linear_cross_entropy", "rms_norm", "swiglu"]
