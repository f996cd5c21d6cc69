"""Model configuration, read from and written to HF `config.json`.

Real Llama-3.1 checkpoints put `rope_theta` and `rope_scaling` at the top level; newer
transformers versions write a `rope_parameters` dict instead. Both are read here so the rest of
the code sees one shape.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: list[int] = field(default_factory=lambda: [128001, 128008, 128009])
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'llama3' is implemented")
            if kind == "default":
                self.rope_scaling = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from the content of an HF `config.json` (either rope layout)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in hf.items() if k in known and v is not None}
        rope = hf.get("rope_parameters")
        if rope:  # newer layout: theta and scaling live in one dict
            kwargs["rope_theta"] = rope.get("rope_theta", kwargs.get("rope_theta", 500000.0))
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            kwargs["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        if "dtype" in hf and "torch_dtype" not in hf:
            kwargs["torch_dtype"] = hf["dtype"]
        if kwargs.get("eos_token_id") is None:
            kwargs["eos_token_id"] = []
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json found at {path}") from None
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid Llama config: {exc}") from None

    def to_hf(self) -> dict[str, Any]:
        """The classic Llama-3.1 `config.json` layout, which transformers and vLLM both read."""
        out = asdict(self)
        eos = out["eos_token_id"]
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            pretraining_tp=1,
            use_cache=True,
        )
        return out
