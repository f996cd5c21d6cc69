"""Llama-3.1 in plain PyTorch: config, module, KV cache, weights, tokenizers and chat templates."""
from .chat import LLAMA3_TEMPLATE, ChatTemplate, TemplateError, tokenize_conversation
from .config import LlamaConfig
from .kv_cache import KVCache
from .llama import Llama
from .tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "ChatTemplate", "TemplateError", "LLAMA3_TEMPLATE", "tokenize_conversation"]
