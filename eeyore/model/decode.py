"""One decode step (a token per running row) over the KV cache, eager or through `torch.compile`.

The engine asks a `DecodeStep` for the next-token logits of the rows in cache slots [0, n).
Eager, that is the readable model's forward. Compiled, the whole step (embedding, every layer,
the cache writes, the final norm and lm_head) becomes one generated program, without Python per
op; on CUDA it is also captured as a CUDA graph (`mode="reduce-overhead"`), as gpt-fast does.

Shapes a compiled program sees:
- the batch is padded up to a bucket (1, 2, 4, 8, ... up to the cache's slots), so a handful of
  programs serve every batch size. Padding rows write their keys at the cache's last position,
  which no real row ever reads: a row that reaches it has no next token to compute.
- on CPU the keys read per step stop at the longest row (`kv_len`, a dynamic size: one program
  for every length); CUDA graphs need fixed sizes, so there every step reads the whole cache,
  the rows' own lengths masking the rest.

A bf16 program on CPU is also frozen: the compiler takes the weights as constants, stores each
in the blocked layout its matrix kernels read fastest, and for each weight shape times its own
generated micro-kernels against the library's product, keeping the faster (the same choice by
measurement as `linear.py`'s, made by the compiler). A decode step is mostly those products
reading the weights, and at 8 rows the generated bf16 kernels read them about 1.5x as fast as
the library's (an AMX Xeon). The price: the program keeps its own copy of the weights (prefill
still runs the model's), a change to the model's weights after compiling is not seen by the
step, and compiling takes minutes longer. fp32 is not frozen: there the frozen step measured no
faster than the plain one (the library's fp32 products win the timing) and took 10x as long to
compile.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch._inductor.config as inductor_config

from .fastpath import speed_up
from .kv_cache import KVCache
from .llama import Llama

log = logging.getLogger("eeyore.model.decode")


def _step(model: Llama, ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          max_len: int, kv_len: int) -> torch.Tensor:
    cache = KVCache(model.config, 0, max_len, _views=(k, v), _span=kv_len)
    return model(ids, positions, cache)[:, -1]


# Frozen (bf16 on CPU): each product is the faster of the compiler's generated kernels ("CPP")
# and the library call ("ATEN"), timed by the compiler for the step's shapes when it compiles.
# The program holds the weights itself, so checking the model's modules before each call (about
# a millisecond for 30 layers' parameters) would guard nothing it reads: those guards are dropped.
FROZEN_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                  "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
FROZEN_SETTINGS = {"freezing": True, "autotune_num_choices_displayed": 0}


class DecodeStep:
    def __init__(self, model: Llama, compile: bool = False) -> None:
        self.model, self.compiled = model, compile
        param = next(model.parameters())
        self.on_cuda = param.is_cuda
        self.frozen = compile and not self.on_cuda and param.dtype == torch.bfloat16
        if compile:
            def step(*args):  # the model is the program's own (a constant when frozen), not an input
                return _step(model, *args)
            # fullgraph: the whole step must be one program (a split would be compiled again for
            # every layer and leave Python between the pieces); anything that breaks it fails here.
            if self.on_cuda:  # CUDA graphs
                self._program = torch.compile(step, dynamic=False, mode="reduce-overhead", fullgraph=True)
            else:
                options = FROZEN_OPTIONS if self.frozen else None
                self._program = torch.compile(step, dynamic=True, options=options, fullgraph=True)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int | None = None) -> torch.Tensor:
        """Logits `[n, V]` of the next token of rows 0..n-1 fed `ids`/`positions` `[n, 1]`.

        `span` is the largest position + 1 when the caller knows it (the engine keeps every
        row's length on the host); then the step never waits for the device to read it back,
        so on a GPU the sampler's copy of the chosen tokens is the step's one synchronisation."""
        n = ids.shape[0]
        if not self.compiled:
            return self.model(ids, positions, cache.rows(0, n, span))[:, -1]
        bucket = self._bucket(n, cache)
        if bucket > n:  # padding rows: token 0 at the last cache position (see module doc)
            ids = torch.cat([ids, ids.new_zeros(bucket - n, 1)])
            positions = torch.cat([positions, positions.new_full((bucket - n, 1), cache.max_len - 1)])
        kv_len = cache.max_len if self.on_cuda else span or cache.span(positions[:n])
        for t in (cache.k, cache.v):  # fixed sizes: no dynamic size may be equated with theirs
            torch._dynamo.mark_static(t)
            if self.on_cuda:  # written in place by the step: a CUDA graph needs their address fixed
                torch._dynamo.mark_static_address(t)
        # Freezing is read from the compiler's global settings at compile time (a compile option
        # does not reach it), so it is set around each call, which is when compiling happens;
        # so is silence for the compiler's table of timings, dozens of lines per weight shape.
        with inductor_config.patch(FROZEN_SETTINGS) if self.frozen else nullcontext():
            return self._program(ids, positions, cache.k, cache.v, cache.max_len, kv_len)[:n]

    def _bucket(self, n: int, cache: KVCache) -> int:
        # CPU: one dynamic program; its batch starts at 2 because size 1 would be specialised.
        return min(cache.slots, max(1 << (n - 1).bit_length(), 1 if self.on_cuda else 2))

    def warm_up(self, cache: KVCache) -> None:
        """Compile, before the first request, every program the steps over `cache` will run:
        each batch bucket (on CPU one dynamic program serves them all), at two lengths so that
        the length is dynamic from the first program on. It writes keys at positions 0 and 1
        (and padding at the last), which a request's prefill overwrites before reading them."""
        if not self.compiled:
            return
        buckets = sorted({self._bucket(n, cache) for n in range(1, cache.slots + 1)})
        for i, bucket in enumerate(buckets):
            log.info("compiling the decode step for %d rows (%d of %d)", bucket, i + 1, len(buckets))
            with torch.inference_mode():  # as the steps will run (grad mode is part of what a program assumes)
                ids = torch.zeros(bucket, 1, dtype=torch.long, device=cache.k.device)
                for position in (0, 1):
                    self(ids, torch.full_like(ids, position), cache, position + 1)


def for_inference(model: Llama, kernels: str = "auto", cpu_matmul: str = "auto", compile: bool = False) -> DecodeStep:
    """Swap the fast variants into `model` (inference-only from here) and give its decode step."""
    speed_up(model, kernels=kernels, cpu_matmul=cpu_matmul, inference=True, may_pack=not compile)
    step = DecodeStep(model, compile)
    if compile:
        log.info("decode step through torch.compile: compiled at start (minutes on CPU the first time; torch "
                 "keeps the result on disk for the next start); its products are the compiler's, the measured "
                 "ones serve prefill%s", "; bf16 on CPU: frozen (the compiler times its kernels per weight shape, "
                 "and the step keeps its own copy of the weights)" if step.frozen else "")
    return step
