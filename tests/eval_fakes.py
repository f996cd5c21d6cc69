"""A scripted OpenAI-compatible endpoint for the evaluator's unit tests (the end-to-end test
uses the project's real server instead)."""
from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from aiohttp import web


def completion(text: str, model: str = "fake") -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeEndpoint:
    """`async with FakeEndpoint(respond) as ep:` serves POST {ep.base_url}/chat/completions.

    respond(body) returns the reply text, or (status, error message) to fail the request; it may
    be a coroutine function (to hold a request back). A request with "stream": true gets the text
    as server-sent events, or, when respond returns a list, one event per item (a string is a
    delta, a dict is sent as it is). Every request body is kept in ep.requests (and its headers in ep.headers)."""

    def __init__(self, respond: Callable[[dict[str, Any]], str | tuple[int, str]]):
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        out = self.respond(body)
        if inspect.isawaitable(out):
            out = await out
        if isinstance(out, tuple):
            status, message = out
            return web.json_response({"error": {"message": message, "type": "fake", "param": None, "code": None}},
                                     status=status)
        if body.get("stream"):
            return await self._stream(request, out if isinstance(out, list) else [out[i:i + 3] for i in range(0, len(out), 3)])
        return web.json_response(completion(out, body.get("model", "fake")))

    async def _stream(self, request: web.Request, events: list) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        for ev in [*events, finish]:
            data = ev if isinstance(ev, dict) else {"choices": [{"index": 0, "delta": {"content": ev}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def __aenter__(self) -> "FakeEndpoint":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()
