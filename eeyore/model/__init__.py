"""Llama-3.1 in plain PyTorch: config, module, KV cache, weights, tokenizers and chat templates."""
from .config import LlamaConfig
from .kv_cache import KVCache
from .llama import Llama

__all__ = ["Llama", "LlamaConfig", "KVCache"]
