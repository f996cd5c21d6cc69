"""Attention of a chunk of queries over a KV cache, bounded by each query's position, no mask.

    out = cached_attention(q, k_cache, v_cache, positions)
    q [B, heads, T, D]; k_cache, v_cache [B, kv_heads, L, D]; positions [B, T] (int)
    query t of row b attends to the cached keys 0..positions[b, t]

It is the decode step (T = 1) and the chunked prefill (T > 1) of the serving engine. The plain
model does the same with SDPA and a boolean [B, 1, T, L] mask, which every fused SDPA backend
rejects together with `enable_gqa`: the fallback "math" kernel repeats K/V for each query head and
reads all L keys of every row. Here:

- one program serves one (row, kv head) and a block of its queries *and* of the query heads that
  share the kv head (grouped-query attention), so each K/V tile is read once for all of them and
  never repeated in memory;
- a program reads keys only up to the largest position among its queries: per-row lengths, not
  the longest row's, and not the whole cache when a CUDA graph fixes L at the cache's length;
- positions per query (not one length per row aligned to the chunk's end) because a padded
  prefill clamps its padding's positions to the cache's end, which would shift the real queries;
- everything in fp32: scores, the online softmax (running max and sum, rescaled per key block)
  and the output sum. The products run on fp32 tiles: exact for fp32 inputs; TF32 for bf16/fp16
  ones, which holds a bf16 value exactly and rounds the probabilities less than bf16 would (and
  Triton's interpreter multiplies bf16 tiles wrongly, so only this is provable on CPU). Decode
  is bound by reading the cache, not by these products.

Why not `torch.nn.attention.varlen.varlen_attn` (torch 2.13; `seqused_k` gives per-row lengths):
it is flash-attn on CUDA only, wants keys laid out [tokens, kv_heads, D] where the cache is
[slot, kv_heads, L, D], aligns a chunk's queries to the row's end (the padding problem above),
and cannot run on CPU, so nothing here could prove it; this kernel runs under Triton's interpreter.
Inference only: no backward (the cache is never trained through).
"""
from __future__ import annotations

import math

import torch

from . import _triton
from ._triton import jit, tl

BLOCK_M = 16  # (query, head) pairs per program: tl.dot's smallest tile
BLOCK_N = 64  # keys per step of the online softmax


@jit
def _attend(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, scale, T, L, D, GROUP,
            sq_b, sq_h, sq_t, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_t, sp_b, sp_t,
            KV_HEADS, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) // KV_HEADS
    kv_head = tl.program_id(0) % KV_HEADS
    # This program's BLOCK_M (query head, query) pairs among the GROUP * T of its kv head.
    pair = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = pair < GROUP * T
    head = kv_head * GROUP + pair // T
    t = pair % T
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    pos = tl.load(pos_ptr + row * sp_b + t * sp_t, mask=live, other=0)
    q = tl.load(q_ptr + row * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + dims[None, :],
                mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    k_base = k_ptr + row * sk_b + kv_head * sk_h
    v_base = v_ptr + row * sv_b + kv_head * sv_h
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum(tl.max(pos, axis=0) + 1, L)  # keys past every query's position are never read
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        kt = tl.load(k_base + keys[None, :] * sk_l + dims[:, None], mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        s = tl.dot(q, kt.to(tl.float32), input_precision=PRECISION)
        s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s * scale, float("-inf"))
        # Key 0 is visible to every query, so `peak` is finite from the first block on.
        new_peak = tl.maximum(peak, tl.max(s, axis=1))
        p = tl.exp(s - new_peak[:, None])
        rescale = tl.exp(peak - new_peak)
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * sv_l + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        peak = new_peak
    out = acc / total[:, None]
    tl.store(o_ptr + row * so_b + head[:, None] * so_h + t[:, None] * so_t + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=live[:, None] & dim_ok[None, :])


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q `[B, heads, T, D]` over k/v `[B, kv_heads, L, D]` (any strides but a
    contiguous last dimension), query t of row b seeing keys 0..positions[b, t] (`[B, T]`, each < L).
    Returns `[B, heads, T, D]` in q's dtype. Equal to SDPA with `enable_gqa` and the mask
    `keys <= positions[:, None, :, None]`."""
    _triton.require(q)
    b, heads, t, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d or heads % kv_heads:
        raise ValueError(f"cached_attention: q {tuple(q.shape)}, k {tuple(k_cache.shape)} and v {tuple(v_cache.shape)} "
                         "do not fit [B, heads, T, D] / [B, kv_heads, L, D] with heads a multiple of kv_heads")
    if positions.shape != (b, t):
        raise ValueError(f"cached_attention: positions {tuple(positions.shape)} must be [B, T] = {(b, t)}")
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    group = heads // kv_heads
    out = _triton.empty(q.shape, q.dtype, q.device)
    grid = (b * kv_heads, (group * t + BLOCK_M - 1) // BLOCK_M)
    if out.numel():
        _attend[grid](q, k_cache, v_cache, out, positions, 1.0 / math.sqrt(d), t, length, d, group,
                      *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3], *positions.stride(),
                      kv_heads, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_D=max(16, _triton.next_power_of_2(d)))
    return out
