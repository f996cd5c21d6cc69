"""A small async client for OpenAI-compatible `/v1/chat/completions` endpoints, on aiohttp.

The other side of the protocol this package serves: the evaluator and the data-building tools
talk through it to the project's server, vLLM, llama.cpp's server or OpenAI alike, and the chat
command and the studio stream replies through it. Transient failures (connection errors,
timeouts, 408/409/429 and 5xx) are retried with exponential backoff and jitter, honouring
`Retry-After`; any other HTTP error is raised at once with the server's message. A streamed reply
is retried only until its first byte: after that a failure ends it with an `EndpointError`.
"""
from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused the request (or kept failing after every retry); `status` is the
    HTTP status of the last answer, None when there was none. (The server's own error envelope
    is `protocol.ErrorReply`.)"""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Sampling:
    """Per-request generation settings; None leaves the server's default in place."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def payload(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


class ChatClient:
    """`await client.chat(messages, sampling)` -> the reply text of the first choice;
    `client.stream(messages, sampling)` -> the same reply as it is generated (`ChatStream`)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_connections: int = 16,
        retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 900.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.max_connections = max_connections
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.requests = 0  # successful requests and their completion tokens, for throughput figures
        self.completion_tokens = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily so that it belongs to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._session

    async def chat(self, messages: list[dict[str, str]], sampling: Sampling | None = None,
                   response_format: dict[str, Any] | None = None) -> str:
        """The reply text; `response_format` (e.g. a JSON schema) is sent only when given."""
        body = {"model": self.model, "messages": messages, **(sampling or Sampling()).payload()}
        if response_format is not None:
            body["response_format"] = response_format
        resp = await self._open(body)
        try:
            text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EndpointError(f"{self.url} broke off its answer: {e or type(e).__name__}") from None
        finally:
            resp.release()
        return self._reply_text(text)

    def stream(self, messages: list[dict[str, str]], sampling: Sampling | None = None,
               extra_body: dict[str, Any] | None = None) -> "ChatStream":
        """The first choice's reply as text deltas, streamed (server-sent events): `async for`
        over the result; its `finish_reason` is set once the deltas end. `extra_body` adds fields
        past OpenAI's (the project's server and vLLM take transformers' `sequence_bias`, ...), as
        the official client's argument of that name does."""
        body = {"model": self.model, "messages": messages, **(sampling or Sampling()).payload(), "stream": True,
                **(extra_body or {})}
        return ChatStream(self, body)

    async def models(self) -> list[str]:
        """The model ids the endpoint's `/models` lists (none when it has no usable list); one
        attempt, so that a wrong URL is reported at once."""
        url = self.url.removesuffix("/chat/completions") + "/models"
        try:
            async with self._http().get(url, headers=self.headers) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else {}
            return [str(m["id"]) for m in data["data"]]
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EndpointError(f"cannot reach {url}: {e or type(e).__name__}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            return []

    async def _open(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST `body` until the endpoint answers 200, retrying transient failures; the caller
        reads the open response and releases it."""
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            delay = self.backoff_s * 2**attempt * (0.5 + random.random())
            try:
                resp = await self._http().post(self.url, json=body, headers=self.headers)
                if resp.status == 200:
                    return resp
                async with resp:
                    last = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                if resp.status not in RETRY_STATUS:
                    raise EndpointError(f"{self.url} refused the request: {last}", resp.status)
                delay = max(delay, _retry_after(resp.headers.get("Retry-After")))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                await asyncio.sleep(delay)
        raise EndpointError(f"{self.url} failed after {self.retries + 1} attempts; last error: {last}")

    def _reply_text(self, text: str) -> str:
        try:
            data = json.loads(text)
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url} returned a response without choices[0].message: {text[:300]!r}") from None
        self.requests += 1
        self.completion_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
        return message.get("content") or ""


class ChatStream:
    """One streamed reply: `async for text in stream` gives the first choice's text deltas;
    `finish_reason` ("stop", "length", ...) is set when they end. Leaving the loop early closes
    the connection, which cancels the request on servers that notice (the project's does)."""

    def __init__(self, client: ChatClient, body: dict[str, Any]) -> None:
        self.client, self.body = client, body
        self.finish_reason: str | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        url = self.client.url
        resp = await self.client._open(self.body)
        try:
            async for raw in resp.content:
                event = _event(raw, url)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                for choice in event.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                self.client.completion_tokens += int((event.get("usage") or {}).get("completion_tokens") or 0)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EndpointError(f"{url} broke off the reply: {e or type(e).__name__}") from None
        finally:
            resp.close()  # a no-op after the whole stream was read; otherwise it drops the connection
        self.client.requests += 1


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
        raise EndpointError(f"{url} sent an event that is not JSON: {data[:200]!r}") from None
    if isinstance(event, dict) and "error" in event:
        raise EndpointError(f"{url} reported an error mid-reply: {_error_message(data)}")
    return event if isinstance(event, dict) else None


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]


def _retry_after(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff covers it
        return 0.0
