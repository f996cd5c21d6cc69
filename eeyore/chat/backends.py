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
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp


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
    """Any OpenAI-compatible `/v1/chat/completions` endpoint, streamed (server-sent events)."""

    def __init__(self, base_url: str, api_key: str | None = None, model_name: str | None = None,
                 plain: bool = False, timeout_s: float = 600.0) -> None:
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_name, self.plain = model_name, plain
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.finish_reason: str | None = None

    async def open(self) -> None:
        """Connect, and take the served model's name from `/models` when none was given."""
        self.session = aiohttp.ClientSession(timeout=self.timeout, headers=self.headers)
        if self.model_name is None:
            try:
                async with self.session.get(self.base + "/models") as resp:
                    data = await resp.json(content_type=None) if resp.status == 200 else {}
                self.model_name = data["data"][0]["id"]
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ChatError(f"cannot reach {self.base}: {exc or type(exc).__name__}") from None
            except (ValueError, KeyError, IndexError, TypeError):
                self.model_name = "eeyore"  # a server without a usable /models: any name it accepts

    def body(self, messages: list[dict[str, str]], s: ChatSampling, turn: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "messages": messages, "stream": True,
                                "temperature": s.temperature, "top_p": s.top_p}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        if s.seed is not None:
            body["seed"] = s.seed + turn
        if not self.plain:  # the project's server (like the reference's) accepts transformers' fields
            if s.decay:
                body["exponential_decay_length_penalty"] = list(s.decay)
            if s.eot_ids and s.eot_bias:
                body["sequence_bias"] = [[list(k), b] for k, b in s.sequence_bias(s.eot_ids)]
        return body

    async def stream(self, messages: list[dict[str, str]], s: ChatSampling, turn: int) -> AsyncIterator[str]:
        assert self.session is not None, "open() first"
        url = self.base + "/chat/completions"
        self.finish_reason = None
        try:
            async with self.session.post(url, json=self.body(messages, s, turn)) as resp:
                if resp.status != 200:
                    raise ChatError(f"{url} answered HTTP {resp.status}: {_error_message(await resp.text())}")
                async for raw in resp.content:
                    event = _event(raw, url)
                    if event is None:
                        continue
                    if event == "[DONE]":
                        return
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ChatError(f"lost {url}: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _event(raw: bytes, url: str) -> Any:
    """One server-sent-event line: None (not data), "[DONE]", or the decoded chunk."""
    line = raw.decode("utf-8", "replace").strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except ValueError:
        raise ChatError(f"{url} sent an event that is not JSON: {data[:200]!r}") from None
    if isinstance(event, dict) and "error" in event:
        raise ChatError(f"{url} reported an error mid-reply: {_error_message(json.dumps(event))}")
    return event if isinstance(event, dict) else None


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
