"""Per-request generation parameters and where their defaults come from.

Defaults are layered in rising priority: transformers' own defaults (which sample with top-k 50
unless told otherwise), the checkpoint's `generation_config.json`, the server's command-line
flags, then the fields of the request. With the reference flags this
reproduces the reference server, which sampled through `generate` with those flags and HF's
implicit top-k of 50. Unlike transformers we ignore `do_sample`: as in every OpenAI-compatible
server, a request samples unless its temperature is 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from typing import Any

SequenceBias = tuple[tuple[tuple[int, ...], float], ...]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 50  # 0 = off; transformers' default whenever it samples
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' multiplicative penalty, over prompt + output
    presence_penalty: float = 0.0  # OpenAI's additive penalties, over the output only
    frequency_penalty: float = 0.0
    sequence_bias: SequenceBias = ()  # ((token ids), bias) pairs; a later duplicate key wins
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start, factor)
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the context length
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # stop on these as well as on the checkpoint's eos ids
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    logprobs: bool = False
    top_logprobs: int = 0
    # response_format compiled by guided_schema.compile_format (a raw response_format dict is
    # compiled on submit); None: free text
    guided: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def updated(self, **changes: Any) -> "SamplingParams":
        """A copy with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PARAM_NAMES = frozenset(f.name for f in fields(SamplingParams))

# The allowed range of each numeric field: (low, high, low excluded). Every value must also be
# finite: a NaN slips through comparisons, and one row's NaN or overflow in the sampler's batched
# step would otherwise hit every stream in the batch. Temperatures below 0.01 other than 0 would
# overflow fp32 when dividing the logits; use 0 for greedy.
RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_k": (-1, 2**31 - 1, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 10.0, True),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "seed": (-(2**63), 2**63 - 1, False),
    "max_tokens": (1, 2**31 - 1, False),
}
MIN_TEMPERATURE = 0.01
MAX_BIAS = 100.0  # OpenAI's bound for logit_bias; -100 already bans a token
MAX_DECAY_FACTOR = 10.0


class ParamError(ValueError):
    """A sampling parameter out of its range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def check_number(name: str, value: Any, where: str | None = None) -> None:
    """Raise ParamError unless `value` is finite and inside RANGES[name]."""
    lo, hi, open_lo = RANGES[name]
    where = where or f"'{name}'"
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamError(name, f"{where} must be a finite number, got {value}")
    if value < lo or value > hi or (open_lo and value == lo):
        raise ParamError(name, f"{where} must be {'>' if open_lo else '>='} {lo} and <= {hi}, got {value}")
    if name == "temperature" and 0 < value < MIN_TEMPERATURE:
        raise ParamError(name, f"{where} must be 0 (greedy) or between {MIN_TEMPERATURE} and {hi}, got {value}")


def check_params(params: "SamplingParams", where: Any = None) -> None:
    """Every numeric field finite and in range; `where(field)` names a field in the message
    (a request field, a server flag). Token ids against the vocabulary are the engine's check."""
    where = where or (lambda name: f"'{name}'")
    for name in RANGES:
        value = getattr(params, name)
        if value is not None:
            check_number(name, value, where(name))
    for ids, bias in params.sequence_bias:
        if not (math.isfinite(bias) and -MAX_BIAS <= bias <= MAX_BIAS):
            raise ParamError("sequence_bias", f"{where('sequence_bias')}: the bias of {list(ids)} must be finite "
                                              f"and within [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias}")
    decay = params.exponential_decay_length_penalty
    if decay is not None:
        start, factor = decay
        if not (0 <= start < 2**31 and math.isfinite(factor) and 0 < factor <= MAX_DECAY_FACTOR):
            raise ParamError("exponential_decay_length_penalty",
                             f"{where('exponential_decay_length_penalty')} must be [start >= 0, 0 < factor <= "
                             f"{MAX_DECAY_FACTOR:g}], got [{start}, {factor}]")

# generation_config.json keys that mean the same as ours (max_new_tokens is renamed).
_GENERATION_CONFIG_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "sequence_bias", "exponential_decay_length_penalty",
)


def parse_sequence_bias(value: Any, where: str = "sequence_bias") -> SequenceBias:
    """Accept transformers' list form `[[[ids...], bias], ...]` (or a JSON string of it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of [token_ids, bias] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        ids, bias = pair if ok else (None, None)
        if not (ok and isinstance(ids, (list, tuple)) and ids
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
                and isinstance(bias, (int, float)) and not isinstance(bias, bool)):
            raise ValueError(f"{where}[{i}]: expected [[token ids >= 0, ...], bias], got {pair!r}")
        if isinstance(bias, int) and abs(bias) > MAX_BIAS:  # float() of a 400-digit integer overflows
            raise ValueError(f"{where}[{i}]: the bias must be within [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        out.append((tuple(ids), float(bias)))
    return tuple(out)


def checkpoint_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a checkpoint's `generation_config.json` sets."""
    out = {k: generation_config[k] for k in _GENERATION_CONFIG_KEYS if generation_config.get(k) is not None}
    if "sequence_bias" in out:
        out["sequence_bias"] = parse_sequence_bias(out["sequence_bias"], "generation_config.json sequence_bias")
    if "exponential_decay_length_penalty" in out:
        start, factor = out["exponential_decay_length_penalty"]
        out["exponential_decay_length_penalty"] = (int(start), float(factor))
    if generation_config.get("max_new_tokens") is not None:
        out["max_tokens"] = int(generation_config["max_new_tokens"])
    return out


def layered_defaults(*layers: dict[str, Any]) -> SamplingParams:
    """HF defaults, then each layer in turn (checkpoint, then server flags); None means unset."""
    params = SamplingParams()
    for layer in layers:
        unknown = set(layer) - PARAM_NAMES
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        params = params.updated(**layer)
    return params


def eos_ids_of(generation_config: dict[str, Any], config_eos: list[int]) -> list[int]:
    """The ids that end generation: generation_config.json's, as transformers uses, else config.json's."""
    eos = generation_config.get("eos_token_id", config_eos)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos or list(config_eos)

