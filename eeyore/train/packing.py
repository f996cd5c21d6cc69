"""`--packing_samples`: a micro-batch's sequences laid end to end in one row instead of padded rows.

Padding a micro-batch to its longest sequence wastes compute in proportion to how unequal the
lengths are (the 12 test conversations run from a few hundred to several thousand tokens). Packed,
the row holds only real tokens. Three things keep the result equal to the padded micro-batch:

- positions restart at 0 for every sequence, so RoPE sees the same angles;
- attention never crosses sequences: the model takes `cu_seqlens` (the sequences' start offsets)
  and attends within each (flash-attn's variable-length kernel on CUDA when installed, causal
  attention sequence by sequence otherwise);
- no target crosses sequences: each sequence is shifted into targets on its own (`tokens.shift`),
  so its last token predicts nothing, as in its padded row.

The loss is then the same token mean over the same targets, so the update is the padded one too
(up to float summation order).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedLayout:
    """Where the sequences of one packed row start and end, and each token's position in its own."""

    positions: torch.Tensor  # [1, S] restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # [n + 1] int32: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]

    @classmethod
    def of(cls, lengths: Sequence[int]) -> "PackedLayout":
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return cls(positions, cu)

    def to(self, device: torch.device | str) -> "PackedLayout":
        return PackedLayout(self.positions.to(device), self.cu_seqlens.to(device))

    def sequence_ids(self) -> torch.Tensor:
        """[S] the index of the sequence each token belongs to."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `Llama.hidden_states` for this row."""
        return {"positions": self.positions, "cu_seqlens": self.cu_seqlens}


def model_inputs(layout: PackedLayout | None) -> dict[str, torch.Tensor]:
    """`hidden_states` keywords of a batch: none for padded rows, the layout for a packed one."""
    return {} if layout is None else layout.model_inputs()


def pack(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """The sequences concatenated into one `[1, S]` row."""
    return torch.tensor([x for s in sequences for x in s])[None]


def flash_attn_warning(device: torch.device, packing: bool) -> str | None:
    """What `--flash_attn` cannot do on this run, or None when flash-attn's kernel will run.

    The model picks flash-attn's variable-length kernel by itself for packed rows on CUDA when the
    package imports; the flag only asks for it, so the user learns when it is not there.
    """
    if device.type != "cuda":
        return "--flash_attn has no effect on the CPU: attention is PyTorch's scaled_dot_product_attention"
    if importlib.util.find_spec("flash_attn") is None:
        return ("--flash_attn: flash-attn is not installed (pip install flash-attn --no-build-isolation); "
                "attention is PyTorch's scaled_dot_product_attention")
    if not packing:
        return ("--flash_attn: padded rows use PyTorch's own flash kernel; flash-attn's variable-length "
                "kernel runs with --packing_samples")
    return None
