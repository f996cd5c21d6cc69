"""A preallocated key/value cache in which every batch row sits at its own position.

Layout: `[layers, slots, kv_heads, max_len, head_dim]`. A slot holds one sequence. The forward
pass writes each new token's key and value at that token's position in its row's slot, and each
query attends to the cached keys at positions up to its own. Rows therefore never need to be at
the same position, which is what continuous batching needs: a request is prefilled into a free
slot and then decodes alongside the others. Stale entries from a slot's previous occupant lie at
positions beyond the new sequence's and are masked until overwritten.
"""
from __future__ import annotations

import torch

from .config import LlamaConfig


class KVCache:
    def __init__(
        self,
        config: LlamaConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        _views: tuple[torch.Tensor, torch.Tensor] | None = None,
        _span: int | None = None,
    ) -> None:
        self.config, self.max_len = config, max_len
        self._span = _span  # L when the caller knows it (see `rows`); None: read from the positions
        if _views is None:
            shape = (config.num_hidden_layers, slots, config.num_key_value_heads, max_len, config.head_dim)
            _views = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self.k, self.v = _views
        self.slots = self.k.shape[1]
        self._index_for: torch.Tensor | None = None  # the positions `_index` was built for
        self._layers = torch.arange(self.k.shape[0], device=self.k.device).view(-1, 1, 1, 1)  # layer indices

    def rows(self, start: int, stop: int, span: int | None = None) -> "KVCache":
        """A view over slots [start, stop): batch row b of a forward pass is slot start + b.

        `span`: how many leading positions the forward pass reads (its largest position + 1),
        when the caller keeps the rows' lengths on the host. Given, the pass need not read its
        positions back from the device, a synchronisation that would stall a GPU every step."""
        if not 0 <= start < stop <= self.slots:
            raise IndexError(f"slots [{start}, {stop}) outside a cache of {self.slots} slots")
        if span is not None and not 0 < span <= self.max_len:
            raise ValueError(f"position {span - 1} is beyond the cache length {self.max_len}")
        return KVCache(self.config, 0, self.max_len, _views=(self.k[:, start:stop], self.v[:, start:stop]), _span=span)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into slot `dst`."""
        for t in (self.k, self.v):
            t[:, dst, :, :length] = t[:, src, :, :length]

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the first cached positions of two slots (`length_a` of a's, `length_b` of b's)."""
        for t in (self.k, self.v):
            kept = t[:, a, :, :length_a].clone()
            t[:, a, :, :length_b] = t[:, b, :, :length_b]
            t[:, b, :, :length_a] = kept

    def span(self, positions: torch.Tensor) -> int:
        """L: how many leading cached positions a forward pass at `positions` `[B, T]` reads."""
        if self._span is not None:
            return self._span
        kv_len = int(positions.max()) + 1  # a host sync, unless `rows` was given the span
        if kv_len > self.max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the cache length {self.max_len}")
        return kv_len

    def attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Mask `[B, 1, T, L]` (True = attend) over the first L = kv_len cached positions."""
        keys = torch.arange(kv_len, device=positions.device)
        return (keys <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v `[B, kv_heads, T, head_dim]` at `positions` `[B, T]`; return the first kv_len cached."""
        # One index_put_ into the whole cache with a tensor for every index, for decode and prefill
        # alike. Eager, that is the fast path of indexed assignment (a slice among the indices
        # takes a far slower one); compiled, it stays a write in place, where a write through a
        # view of the cache is turned into a copy of the whole cache at every step.
        index = (self._layers[layer], *self._row_index(positions, k.shape[1]))
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)
        batch = k.shape[0]
        return self.k[layer, :batch, :, :kv_len], self.v[layer, :batch, :, :kv_len]

    def _row_index(self, positions: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
        """(row, head, position) indices of a pass's entries: the same in every layer, so built
        once per pass (keyed by its positions tensor)."""
        if self._index_for is not positions:
            device, batch = positions.device, positions.shape[0]
            self._index = (torch.arange(batch, device=device)[:, None, None],
                           torch.arange(heads, device=device)[None, :, None], positions[:, None, :])
            self._index_for = positions
        return self._index
