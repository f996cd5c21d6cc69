"""Where the client's replies come from: the model in this process (the serving engine) or any
OpenAI-compatible endpoint, both streaming text as it is generated.

The reference served its simulated clients with temperature 1.0, top-p 0.8, a -4.0 bias on the
end-of-turn token and an exponential decay length penalty (0, 1.01): the bias keeps replies from
ending at once, the decay raises the end-of-turn logit the longer a reply gets, so replies are
neither clipped nor rambling. `ChatSampling` holds those defaults; each backend maps them onto
its own request.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from eeyore.serve.client import ChatClient, EndpointError, Sampling


class ChatError(RuntimeError):
    """The conversation cannot go on (endpoint unreachable, context full); one line for the user."""


@dataclass(frozen=True)
class ChatSampling:
    temperature: float = 1.0
    top_p: float = 0.8
    eot_bias: float = -4.0  # added to the end-of-turn logit (the reference's sequence bias)
    decay: tuple[int, float] | None = (0, 1.01)  # exponential decay length penalty (start, factor)
    max_tokens: int | None = None  # None: up to the context left (in process) or the server's default
    seed: int | None = None  # turn k samples with seed + k, so a session replays exactly
    eot_ids: tuple[int, ...] | None = None  # None: the model's own end-of-turn id (known in process only)

    def sequence_bias(self, eot_ids: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], float], ...]:
        """The reference's `[[[eot], -4.0]]`: one single-token entry per end-of-turn id."""
        return tuple(((t,), self.eot_bias) for t in eot_ids) if self.eot_bias else ()

    def describe(self, eot_ids: tuple[int, ...] | None) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "sequence_bias": [[list(k), b] for k, b in self.sequence_bias(eot_ids)] if eot_ids else None,
                "exponential_decay_length_penalty": list(self.decay) if self.decay else None,
                "max_tokens": self.max_tokens, "seed": self.seed}


class EngineBackend:
    """The model in this process, through the serving engine (one slot: one conversation)."""

    def __init__(self, model: str | None, device: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, chat_template: str | None = None) -> None:
        import torch  # here, so that talking to a URL never pays for importing torch

        from eeyore.serve.engine import Engine

        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_ = dtype if dtype != "auto" else ("float32" if device == "cpu" else None)
        self.engine = Engine.from_pretrained(model, dtype_, device, max_batch_size=1, max_queue=1,
                                             max_model_len=max_model_len, chat_template=chat_template)
        self.engine.start()
        self.finish_reason: str | None = None

    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The tokenizer's own eos token: the token training appends after every turn (Llama-3.1
        Instruct: <|eot_id|> = 128009, the id the reference biased; SmolLM2: <|im_end|>)."""
        return (self.engine.tokenizer.eos_ids[0],)

    def params(self, s: ChatSampling, turn: int) -> Any:
        eot = s.eot_ids or self.end_of_turn_ids()
        return self.engine.defaults.updated(
            temperature=s.temperature, top_p=s.top_p, sequence_bias=s.sequence_bias(eot),
            exponential_decay_length_penalty=s.decay, max_tokens=s.max_tokens,
            seed=None if s.seed is None else s.seed + turn)

    async def stream(self, messages: list[dict[str, str]], s: ChatSampling, turn: int) -> AsyncIterator[str]:
        from eeyore.serve.request import InvalidRequest

        params = self.params(s, turn)
        prompt = self.engine.encode_chat(messages)
        room = self.engine.max_model_len - len(prompt)
        if room < 2:
            raise ChatError(f"the conversation ({len(prompt)} tokens) fills the model's context of "
                            f"{self.engine.max_model_len} tokens: start a new session (or raise --max-model-len)")
        if params.max_tokens is not None and params.max_tokens > room:
            params = params.updated(max_tokens=room)  # the end of the context ends the reply
        queue: asyncio.Queue = asyncio.Queue()
        try:
            req = self.engine.submit_async(prompt, params, queue, 0)
        except InvalidRequest as exc:
            raise ChatError(str(exc)) from None
        self.finish_reason = None
        try:
            while True:
                _, out = await queue.get()
                if out.finish_reason == "error":
                    raise ChatError(f"the model failed: {out.text}")
                if out.text:
                    yield out.text
                if out.finish_reason is not None:
                    self.finish_reason = out.finish_reason
                    return
        finally:
            if not req.done:
                self.engine.abort(req)

    async def close(self) -> None:
        self.engine.close()


class HTTPBackend:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint, streamed through the project's
    client (`eeyore.serve.client.ChatClient`)."""

    def __init__(self, base_url: str, api_key: str | None = None, model_name: str | None = None,
                 plain: bool = False, timeout_s: float = 600.0) -> None:
        self.model_name, self.plain = model_name, plain
        # A person is waiting: one quick retry, not the evaluator's patient backoff.
        self.client = ChatClient(base_url, model_name or "", api_key, max_connections=2, retries=1, backoff_s=0.5,
                                 timeout_s=timeout_s)
        self.finish_reason: str | None = None

    async def open(self) -> None:
        """Connect, and take the served model's name from `/models` when none was given."""
        if self.model_name is None:
            try:
                names = await self.client.models()
            except EndpointError as exc:
                raise ChatError(str(exc)) from None
            self.model_name = names[0] if names else "eeyore"  # no usable /models: any name it accepts
            self.client.model = self.model_name

    def request(self, s: ChatSampling, turn: int) -> tuple[Any, dict[str, Any]]:
        """(the OpenAI sampling fields, the extra fields) of turn `turn`'s request."""
        sampling = Sampling(s.temperature, s.top_p, s.max_tokens, None if s.seed is None else s.seed + turn)
        extra: dict[str, Any] = {}
        if not self.plain:  # the project's server (like the reference's) accepts transformers' fields
            if s.decay:
                extra["exponential_decay_length_penalty"] = list(s.decay)
            if s.eot_ids and s.eot_bias:
                extra["sequence_bias"] = [[list(k), b] for k, b in s.sequence_bias(s.eot_ids)]
        return sampling, extra

    async def stream(self, messages: list[dict[str, str]], s: ChatSampling, turn: int) -> AsyncIterator[str]:
        self.finish_reason = None
        reply = self.client.stream(messages, *self.request(s, turn))
        try:
            async for text in reply:
                yield text
        except EndpointError as exc:
            raise ChatError(str(exc)) from None
        self.finish_reason = reply.finish_reason

    async def close(self) -> None:
        await self.client.close()
