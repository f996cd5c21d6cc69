"""Where client replies come from: the engine in this process, or any OpenAI-compatible server.

Both stream a reply as text deltas and offer the reference's sampling settings as defaults
(temperature 1.0, top-p 0.8, the end-of-turn token biased by -4.0, exponential decay (0, 1.01)),
which the pages show and let the trainee change per session.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from eeyore.serve.client import ChatClient, Sampling
from eeyore.serve.engine import Engine
from eeyore.serve.params import parse_sequence_bias
from eeyore.train.dpo_data import end_of_turn_id

EOT_BIAS = -4.0
DECAY = [0, 1.01]
MAX_TOKENS = 512  # the reference allowed 4096; the decay penalty ends replies long before


class SettingsError(ValueError):
    """A sampling setting a page sent is out of range; the message names it."""


def check_settings(raw: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """A complete, checked settings dict: `defaults` with the fields `raw` gives replaced."""
    if not isinstance(raw, dict):
        raise SettingsError("settings must be an object")
    unknown = set(raw) - set(defaults)
    if unknown:
        raise SettingsError(f"unknown setting {sorted(unknown)[0]!r} (known: {', '.join(defaults)})")
    out = {**defaults, **raw}

    def number(name: str, low: float, high: float, integer: bool = False) -> None:
        v = out[name]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
        if not ok or not low <= v <= high:
            raise SettingsError(f"setting {name!r} must be a{'n integer' if integer else ' number'} in [{low}, {high}], got {v!r}")
        out[name] = int(v) if integer else float(v)

    number("temperature", 0.0, 5.0)
    number("top_p", 0.0, 1.0)
    number("max_tokens", 1, 4096, integer=True)
    try:
        out["sequence_bias"] = [[list(k), b] for k, b in parse_sequence_bias(out["sequence_bias"])]
    except ValueError as exc:
        raise SettingsError(f"setting {exc}") from None
    decay = out["exponential_decay_length_penalty"]
    if decay is not None:
        if not (isinstance(decay, list) and len(decay) == 2 and all(isinstance(x, (int, float)) for x in decay)
                and decay[0] >= 0 and decay[1] > 0):
            raise SettingsError("setting 'exponential_decay_length_penalty' must be [start >= 0, factor > 0] or null")
        out["exponential_decay_length_penalty"] = [int(decay[0]), float(decay[1])]
    return out


class EngineBackend:
    """The engine on `model` (None: the embedded model), loaded in a thread when the app starts."""

    def __init__(self, model: str | None, max_batch_size: int = 16) -> None:
        self.model_name, self.max_batch_size = model, max_batch_size
        self.engine: Engine | None = None
        self.label = model or "the embedded model"

    def load(self) -> None:
        self.engine = Engine.from_pretrained(self.model_name, "float32", "cpu", max_batch_size=self.max_batch_size).start()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def defaults(self) -> dict[str, Any]:
        e = self._ready()
        eot = end_of_turn_id(e.tokenizer, e.template)  # the model's own end of turn (128009 for Llama 3)
        return {"temperature": 1.0, "top_p": 0.8, "max_tokens": MAX_TOKENS,
                "sequence_bias": [[[eot], EOT_BIAS]], "exponential_decay_length_penalty": list(DECAY)}

    def _ready(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the model is still loading")
        return self.engine

    async def stream(self, messages: list[dict[str, str]], settings: dict[str, Any]) -> AsyncIterator[str]:
        e = self._ready()
        decay = settings["exponential_decay_length_penalty"]
        # `replace`, not `updated`: a None here must switch the decay off, not keep the default
        params = replace(e.defaults, temperature=settings["temperature"], top_p=settings["top_p"],
                         max_tokens=settings["max_tokens"], sequence_bias=parse_sequence_bias(settings["sequence_bias"]),
                         exponential_decay_length_penalty=tuple(decay) if decay else None)
        queue: asyncio.Queue = asyncio.Queue()
        req = e.submit_async(e.encode_chat(messages), params, queue)
        try:
            while True:
                _, out = await queue.get()
                if out.finish_reason == "error":
                    raise RuntimeError(out.text)
                if out.text:
                    yield out.text
                if out.finish_reason is not None:
                    return
        finally:
            if not req.done:
                e.abort(req)


class OpenAIBackend:
    """Any OpenAI-compatible server's streaming chat completions under `base_url` (…/v1), through
    the project's client (`eeyore.serve.client.ChatClient`)."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None) -> None:
        self.model, self.label = model, base_url
        # Trainees are waiting: one quick retry; a reply may take a while on a busy server.
        self.client = ChatClient(base_url, model or "", api_key, retries=1, backoff_s=0.5, timeout_s=900.0)

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def defaults(self) -> dict[str, Any]:
        # Token ids are the server's business: no end-of-turn bias unless the trainee names ids.
        return {"temperature": 1.0, "top_p": 0.8, "max_tokens": MAX_TOKENS, "sequence_bias": [],
                "exponential_decay_length_penalty": list(DECAY)}

    async def stream(self, messages: list[dict[str, str]], settings: dict[str, Any]) -> AsyncIterator[str]:
        if self.model is None:  # the served model's name, asked once
            names = await self.client.models()
            self.model = self.client.model = names[0] if names else "eeyore"
        sampling = Sampling(settings["temperature"], settings["top_p"], settings["max_tokens"])
        extra = {key: settings[key] for key in ("sequence_bias", "exponential_decay_length_penalty")
                 if settings[key]}  # vLLM-style extensions, sent only when set
        async for text in self.client.stream(messages, sampling, extra):
            yield text

    async def aclose(self) -> None:
        await self.client.close()


async def complete(backend: EngineBackend | OpenAIBackend, messages: list[dict[str, str]], settings: dict[str, Any]) -> str:
    """A whole reply (the annotation queue's live candidates)."""
    return "".join([d async for d in backend.stream(messages, settings)])
