"""How big the KV cache is: its slots (sequences decoded together) and their length (the context).

The default context is the model's own (`max_position_embeddings`), bounded by the memory this
machine can give the cache: on CUDA a fraction (`--gpu-memory-utilization`, vLLM's name) of the
memory still free once the weights are loaded; on CPU a fraction of the RAM the kernel reports
available. The cache is allocated up front (slots x length positions), so when the budget cannot
hold every requested slot at the full context, the context shrinks first, but not below
MIN_CONTEXT; below that the number of slots shrinks instead.
"""
from __future__ import annotations

import logging
import os

import torch

from eeyore.model import LlamaConfig

log = logging.getLogger("eeyore.serve")
MIN_CONTEXT = 4096  # the reference generated up to 4096 new tokens: keep at least that room
GPU_MEMORY_UTILIZATION = 0.9
CPU_MEMORY_FRACTION = 0.25  # leaves room for the weights, the tokenizer and the rest of the machine


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Keys and values of one position in one slot, over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def available_bytes(device: torch.device) -> int:
    """Memory the cache could use: free GPU memory, or the RAM available to new allocations."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_cache(config: LlamaConfig, dtype: torch.dtype, device: torch.device, slots: int,
               max_len: int | None, fraction: float | None) -> tuple[int, int]:
    """(slots, context length) for the cache. An explicit `max_len` is kept (bounded by the
    model's positions); the default is the largest context the budget allows."""
    if fraction is None:
        fraction = GPU_MEMORY_UTILIZATION if device.type == "cuda" else CPU_MEMORY_FRACTION
    if not 0 < fraction <= 1:
        raise ValueError(f"the KV-cache memory fraction must be in (0, 1], got {fraction}")
    model_len = config.max_position_embeddings
    budget = int(available_bytes(device) * fraction) // kv_bytes_per_token(config, dtype)  # in positions
    if max_len is not None:
        length = min(max_len, model_len)
    else:
        length = min(model_len, budget // slots)
        if length < min(model_len, MIN_CONTEXT):
            length = min(model_len, MIN_CONTEXT, budget)
    if length < 2:
        raise MemoryError(f"no room for a KV cache: {budget} positions fit in {fraction:g} of the free memory")
    fit = max(1, budget // length)
    if fit < slots:
        log.warning("the KV cache budget holds %d slots of %d positions, not %d: using %d", fit, length, slots, fit)
        slots = fit
    return slots, length
