"""Llama 3.1 as HF ships it: one module, HF parameter names, so checkpoints load without renaming.

Reading order: `Llama.forward` → `Block` → `Attention` / `MLP`; `rope_inverse_frequencies` holds the
llama3 frequency scaling.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .kv_cache import KVCache
from .pretrained import load_pretrained
from .weights import save_checkpoint


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of split-half RoPE, with Llama 3's long-context scaling when configured."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    s = config.rope_scaling
    if s is None:
        return inv.float()
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    original = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    # Short wavelengths stay, long ones are divided by `factor`, the band between is blended.
    blend = (original / wavelength - low) / (high - low)
    mixed = (1 - blend) * inv / factor + blend * inv
    scaled = torch.where(wavelength > original / low, inv / factor, mixed)
    return torch.where(wavelength < original / high, inv, scaled).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-half rotary embedding of queries and keys `[B, heads, T, D]` (cos/sin `[B, 1, T, D]`)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF does: bf16 results match.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: "Context") -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, *rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx.positions, ctx.kv_len)
        return self.o_proj(self.attend(q, k, v, ctx).transpose(1, 2).reshape(b, t, -1))

    # The two steps a faster variant may replace (see `eeyore/model/fastpath.py`).
    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "Context") -> torch.Tensor:
        """Softmax attention of q `[B, heads, T, D]` over k/v `[B, kv_heads, L, D]`; each kv head
        serves heads // kv_heads query heads (grouped-query attention). Sequences packed into one
        row (`cu_seqlens`) attend only within themselves."""
        if ctx.cu_seqlens is not None and ctx.cache is None:
            return packed_attention(q, k, v, ctx.cu_seqlens)
        mask = ctx.mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: "Context") -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class Context:
    """What every layer of one forward pass shares: cache, positions and the attention mask.

    With a cache, query t of row b sees the cached keys at positions <= positions[b, t], among
    the first `kv_len`; packed sequences (`cu_seqlens`) see only their own sample's keys. The
    mask is built on first use, once per forward pass, so a variant that attends by lengths
    instead never builds it. A pass that fills a cache from its start (every row's queries are
    positions 0..T-1, T = kv_len: a prompt's first chunk) needs none: that is plain causal
    attention, whose kernels also skip the keys after each query.
    """

    def __init__(self, positions: torch.Tensor, cache: KVCache | None, cu_seqlens: torch.Tensor | None) -> None:
        self.positions, self.cache, self.cu_seqlens = positions, cache, cu_seqlens
        self.kv_len = cache.span(positions) if cache is not None else positions.shape[1]
        self._mask: torch.Tensor | None = None
        self._shared: dict[str, Any] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        """Boolean `[B, 1, T, L]` (True = attend), or None for plain causal attention."""
        if self._mask is None and self.cache is not None and not self.fills_from_start():
            self._mask = self.cache.attention_mask(self.positions, self.kv_len)
        return self._mask

    def fills_from_start(self) -> bool:
        """Whether every row's queries are positions 0..T-1 and nothing else is read (T = kv_len)."""
        t = self.positions.shape[1]
        if torch.compiler.is_compiling() or t == 1 or t != self.kv_len:  # a decode step never is
            return False
        return self.shared("from start", lambda: bool((self.positions == torch.arange(t, device=self.positions.device)).all()))

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        """A value every layer of this pass uses (a variant's layout of the mask, say), built
        by the first layer that asks for it."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention within each sequence of one packed row (`[1, heads, T, D]`).

    Sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]; none attends to another. Attending
    sequence by sequence costs the sum of their squared lengths, where one block-diagonal mask
    over the row would cost the row's squared length and rule out the fused causal kernels.
    """
    bounds = cu_seqlens.tolist()
    parts = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(parts, dim=2)


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, blocks and final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain attribute, not a buffer: it must not appear in the state dict and must survive
        # construction on the meta device (explicit cpu overrides a `torch.device` context).
        self.inv_freq = rope_inverse_frequencies(config)
        self.generation_config: dict[str, Any] = {}

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, T, D/2], fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states `[B, T, H]` (the training loss projects them in chunks)."""
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache: each row sits at its own position")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        h = self.model.embed_tokens(input_ids)
        rope = self._rope(positions, h.dtype)
        ctx = Context(positions, cache, cu_seqlens)
        for block in self.model.layers:
            h = block(h, rope, ctx)
        return self.model.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, cu_seqlens))

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> "Llama":
        """Load a HF-format checkpoint (a folder or a hub id in the local cache); None loads the
        embedded default model. `dtype` defaults to the checkpoint's. See `pretrained.py`."""
        return load_pretrained(cls, path_or_hub_id, dtype, device).eval()

    def save_pretrained(self, out_dir: str | Path, tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write an HF checkpoint (config, generation config, safetensors, tokenizer with template)."""
        if any(isinstance(m, nn.Linear) and not isinstance(m.weight, nn.Parameter) for m in self.modules()):
            raise ValueError("this model's weights were replaced by inference-only copies (fastpath.speed_up): "
                             "save it before speeding it up")
        return save_checkpoint(out_dir, self.state_dict(), self.config, tokenizer, self.generation_config or None, max_shard_bytes)

