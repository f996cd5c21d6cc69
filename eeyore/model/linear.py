"""`x @ weight.T` on CPU (fp32; bf16 for inference) by the product fastest on the machine at hand.

Three products compute the same thing: `blas` (`F.linear`, i.e. whatever BLAS torch was built
with), `onednn` (oneDNN's inner product on the plain weight, as PyTorch's own compiler calls it)
and `packed` (oneDNN on a copy of the weight in its blocked layout: inference only). Which is
fastest depends on the CPU: the same code measured 2x apart in either direction on two x86
machines. So nothing here assumes a winner: `measure` times the candidates for a model's real
weight shapes and `use` records the fastest for each of two row classes, few rows (a decode step)
and many rows (prefill, training). Until something is chosen every product is `blas`.

In bf16, `F.linear` is itself oneDNN, but on the plain weight it reorders that weight into its
blocked layout at every call: a packed copy skips that (about 20-30 % off a decode step's
products on an AVX-512/AMX Xeon), so bf16 inference chooses between `blas` and `packed` the same
way; bf16 training keeps `F.linear`. fp16, CUDA and empty inputs always take `F.linear`.
With gradients on, `onednn` runs the two backward products through oneDNN too
(grad_x = grad @ W, grad_W = grad.T @ x).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bf16 through oneDNN needs a CPU it supports bf16 on (AVX-512 or newer); elsewhere bf16 takes F.linear.
DTYPES = (torch.float32, torch.bfloat16) if ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
PRODUCTS = ("blas", "onednn", "packed")
FEW_ROWS = 16  # at most this many rows: the decode class (one row per running sequence)
PACK_ROWS_HINT = 16  # the row count oneDNN blocks a packed weight for; 1-512 rows all run well with it
log = logging.getLogger("eeyore.model.linear")

# row class -> product, set by `use`; "packed" only names what packed weights do: a plain
# weight then takes `few_plain` (the tied lm_head shares the embedding's table and stays plain).
_chosen = {"few": "blas", "many": "blas", "few_plain": "blas"}


def use(few: str, many: str, few_plain: str | None = None) -> None:
    """Make `few` the product for inputs of at most FEW_ROWS rows and `many` for larger ones."""
    few_plain = few_plain or ("onednn" if few == "packed" else few)
    for name in (few, many, few_plain):
        if name not in PRODUCTS:
            raise ValueError(f"unknown CPU product {name!r}: one of {', '.join(PRODUCTS)}")
    if few_plain == "packed" or (many == "packed" and few != "packed"):
        raise ValueError("packed products need packed weights, which only the few-row choice makes")
    _chosen.update(few=few, many=many, few_plain=few_plain)


def chosen() -> dict[str, str]:
    return dict(_chosen)


def _inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN (a: [..., K], b: [N, K], plain or packed)."""
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


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN can compute this product: fp32 (or supported bf16) CPU tensors, non-empty."""
    return ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DTYPES and x.numel() > 0


def packable(weight: torch.Tensor) -> bool:
    return weight.layout == torch.strided and uses_onednn(weight, weight)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a CPU weight `[N, K]` (fp32 or bf16), for `linear` without gradients."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def row_class(x: torch.Tensor) -> str:
    return "few" if x.numel() <= FEW_ROWS * x.shape[-1] else "many"


def linear(x: torch.Tensor, weight: torch.Tensor, product: str | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, by `product` (default: the one chosen for x's rows).

    A packed weight always takes the packed product; a plain one takes `onednn` when that is
    the choice (`packed` needs a packed weight, which only `pack_weight` makes).
    """
    if weight.layout == torch._mkldnn:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a weight packed for inference has no gradient: run under torch.no_grad()")
        return _inner_product(x, weight)
    if product is None:
        product = _chosen[row_class(x)]
        product = _chosen["few_plain"] if product == "packed" else product
    # Under torch.compile the compiler picks the product itself (its oneDNN lowering wants
    # weights it may treat as constants, which a model's parameters are not).
    if not uses_onednn(x, weight) or product == "blas" or torch.compiler.is_compiling():
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _OneDNNLinear.apply(x, weight)
    return _inner_product(x, weight)


# ---------------------------------------------------------------------- measurement

# A weight larger than this is timed on its first rows: few-row products stream the weight, so
# 2**24 elements (64 MiB in fp32) keep it out of the caches as the real one is; many-row
# products are bound by compute, and a smaller slice keeps an 8B model's measurement well under
# a second.
FEW_ROWS_ELEMENTS, MANY_ROWS_ELEMENTS = 2**24, 2**20
MANY_ROWS_PROBE = 128


def measure(shapes: Iterable[tuple[int, int, int]], candidates: Iterable[str], rows: int,
            backward: bool = False, repeats: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Seconds each candidate takes for one product of every `(count, N, K)` weight shape (weighted
    by count) at `rows` input rows; with `backward`, the two gradient products too. Candidates
    alternate and the best of `repeats` counts, so a busy neighbour skews them alike."""
    torch.manual_seed(0)
    cases = []
    for count, n, k in shapes:
        n = max(1, min(n, (FEW_ROWS_ELEMENTS if rows <= FEW_ROWS else MANY_ROWS_ELEMENTS) // k))
        w = (torch.randn(n, k) / k**0.5).to(dtype)
        cases.append((count, w, pack_weight(w) if "packed" in candidates else None, torch.randn(rows, k).to(dtype)))
    best = {c: float("inf") for c in candidates}
    for _ in range(repeats):
        for c in best:
            total = 0.0
            for count, w, packed, x in cases:
                total += count * _time_one(c, x, packed if c == "packed" else w, backward)
            best[c] = min(best[c], total)
    return best


def _time_one(product: str, x: torch.Tensor, w: torch.Tensor, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            linear(x, w, product)  # first call: oneDNN builds its primitive, not part of the product
            start = time.perf_counter()
            linear(x, w, product)
            return time.perf_counter() - start
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear(x, w, product).sum().backward()
    start = time.perf_counter()
    linear(x, w, product).sum().backward()
    return time.perf_counter() - start


def chooses_for(dtype: torch.dtype, inference: bool) -> bool:
    """Whether a model of this dtype gets a choice of products: fp32 always, bf16 for inference
    (in training bf16's `F.linear` is already oneDNN, and packing is what bf16 gains)."""
    return dtype == torch.float32 or (inference and dtype == torch.bfloat16)


def check_forced(forced: str, inference: bool = True, may_pack: bool = True) -> None:
    """ValueError, naming the flag, for a `--cpu-matmul` value these settings cannot take."""
    if forced == "packed" and not inference:
        raise ValueError("--cpu-matmul packed: packed weights are for inference only (they have no gradient)")
    if forced == "packed" and not may_pack:
        raise ValueError("--cpu-matmul packed cannot be combined with --compile: the compiler takes plain weights")
    if forced not in ("auto", *PRODUCTS):
        raise ValueError(f"--cpu-matmul {forced}: use auto, {', '.join(PRODUCTS)}")


def choose(shapes: list[tuple[int, int, int]], forced: str = "auto", inference: bool = True,
           may_pack: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Measure and `use` the fastest product per row class for these `(count, N, K)` weight shapes.

    `forced` names one product for both classes instead (`--cpu-matmul`). Training (`inference`
    False) measures forward plus backward and never packs; nor does a model about to be compiled
    (`may_pack` False: the compiler takes plain weights). `dtype` is the weights' (bf16 only for
    inference). Returns the choice, which is logged.
    """
    if dtype != torch.float32 and not inference:
        raise ValueError(f"CPU products are chosen for {dtype_name(dtype)} inference only (training takes F.linear)")
    check_forced(forced, inference, may_pack)
    if forced != "auto":
        use(forced, forced)
        log.info("CPU %s products: %s (forced)", dtype_name(dtype), forced)
        return chosen()
    if dtype not in DTYPES:
        use("blas", "blas")
        return chosen()
    start = time.perf_counter()
    if inference:
        few = measure(shapes, ["blas", "onednn", "packed"] if may_pack else ["blas", "onednn"], rows=1, dtype=dtype)
        plain = {k: v for k, v in few.items() if k != "packed"}
        packs = min(few, key=few.get) == "packed"
        many = {"packed": 0.0} if packs else measure(shapes, ["blas", "onednn"], rows=MANY_ROWS_PROBE, dtype=dtype)
    else:
        plain = few = measure(shapes, ["blas", "onednn"], rows=1, backward=True)
        many = measure(shapes, ["blas", "onednn"], rows=MANY_ROWS_PROBE, backward=True)
    pick = lambda times: min(times, key=times.get)
    use(pick(few), pick(many), pick(plain))
    log.info("CPU %s products: few rows %s, many rows %s%s (measured in %.2f s; few rows %s)", dtype_name(dtype),
             _chosen["few"], _chosen["many"], " (packed weights serve every row count)" if _chosen["few"] == "packed" else "",
             time.perf_counter() - start, _fmt(few))
    return chosen()


def _fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
