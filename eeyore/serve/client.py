"""A small async client for OpenAI-compatible `/v1/chat/completions` endpoints, on aiohttp.

The other side of the protocol this package serves: the evaluator and the data-building tools
talk through it to the project's server, vLLM, llama.cpp's server or OpenAI alike. Transient failures
(connection errors, timeouts, 408/409/429 and 5xx) are retried with exponential backoff and
jitter, honouring `Retry-After`; any other HTTP error is raised at once with the server's message.
"""
from __future__ import annotations

import asyncio
import json
import random
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

    def payload(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


class ChatClient:
    """`await client.chat(messages, sampling)` -> the reply text of the first choice."""

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
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            delay = self.backoff_s * 2**attempt * (0.5 + random.random())
            try:
                async with self._http().post(self.url, json=body, headers=self.headers) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return self._reply_text(text)
                    last = f"HTTP {resp.status}: {_error_message(text)}"
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
