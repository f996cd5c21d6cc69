"""Llama-3.1 in plain PyTorch: config, module, KV cache, weights, tokenizers and chat templates.

How to read this package: `config.py` (what a checkpoint's config.json says), then `llama.py`
(the whole forward pass, top to bottom: RoPE, grouped-query attention, SwiGLU MLP, RMSNorm),
`kv_cache.py` (one slot per batch row), `pretrained.py` (the one checkpoint loader, over
`lookup.py` for where a model is and `weights.py` for safetensors), `tokenizer.py` and `chat.py`
(text to ids, and which ids are the assistant's). The speed-ups live outside the readable
module and are swapped in by `fastpath.speed_up` (`linear.py`: the CPU products chosen by
measurement; `decode.py`: the decode step, eager or compiled)."""
from .chat import LLAMA3_TEMPLATE, ChatTemplate, TemplateError, tokenize_conversation
from .config import LlamaConfig
from .kv_cache import KVCache
from .llama import Llama
from .tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "ChatTemplate", "TemplateError", "LLAMA3_TEMPLATE", "tokenize_conversation"]
