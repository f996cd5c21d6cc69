"""aiohttp routes of the OpenAI-compatible server.

The model loads in a worker thread after the server starts listening, so `/health` answers 503
until it is ready. Handlers only validate and format; tokenizing runs on a helper thread (a
large body must not stall the event loop) and generation on the engine's own thread. A client
that goes away cancels its handler (aiohttp's handler cancellation, on for this server), which
aborts its requests and frees their slots. While the server drains for shutdown (`lifecycle.py`)
new requests get 503 and running ones carry on.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from eeyore.model.chat import TemplateError

from .engine import Engine
from .request import EngineClosed, EngineError, EngineFull, InvalidRequest, Output
from .protocol import (
    MAX_MESSAGES,
    ErrorReply,
    ParsedRequest,
    bad,
    chat_logprobs,
    completion_logprobs,
    envelope,
    new_id,
    parse_chat,
    parse_completion,
    usage,
)

log = logging.getLogger("eeyore.serve")
MAX_BODY_BYTES = 8 * 2**20


@dataclass
class Settings:
    """What the routes need to know about this server, besides the engine."""

    model: str  # the served name, reported in every response and in /v1/models
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_messages: int = MAX_MESSAGES
    strict_model_name: bool = False  # True: 404 for any other `model` than the served name
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # shutting down: no new requests
    active: int = 0  # HTTP requests generating now


ENGINE = web.AppKey("engine", Engine)
LOADING = web.AppKey("loading", asyncio.Future)
SETTINGS = web.AppKey("settings", Settings)


def create_app(load_engine: Callable[[], Engine], model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_messages: int = MAX_MESSAGES,
               strict_model_name: bool = False) -> web.Application:
    """`load_engine` runs in a thread at startup; until it returns, generation routes answer 503."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[error_middleware, auth_middleware])
    app[SETTINGS] = Settings(model_name, api_key, max_body_bytes, max_messages, strict_model_name)

    async def start_loading(app: web.Application) -> None:
        # Its own daemon thread, not the loop's executor (whose threads the interpreter waits for
        # at exit): a server stopped while loading, which with --compile takes minutes, exits at once.
        loop = asyncio.get_running_loop()
        app[LOADING] = loaded = loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:  # on the loop
            if not loaded.done():
                setter(value)

        def load() -> None:
            try:
                outcome = (loaded.set_result, load_engine().start())
            except Exception as exc:  # handed to the loop, which reports it and ends the server
                outcome = (loaded.set_exception, exc)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the loop has closed: the server stopped while this loaded
                pass

        threading.Thread(target=load, name="eeyore-load", daemon=True).start()

    async def stop_engine(app: web.Application) -> None:
        loading = app[LOADING]
        if loading.done() and not loading.cancelled() and loading.exception() is None:
            await asyncio.get_running_loop().run_in_executor(None, loading.result().close)

    app.on_startup.append(start_loading)
    app.on_cleanup.append(stop_engine)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app


# ----------------------------------------------------------------------------- middleware


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every error leaves in the OpenAI envelope; only our own faults are 5xx."""
    try:
        return await handler(request)
    except ErrorReply as err:
        return web.json_response(err.body(), status=err.status, headers=err.headers)
    except web.HTTPException as exc:  # routing (404, 405) and body size (413)
        if exc.status < 400:
            raise
        err = ErrorReply(exc.status, exc.reason if exc.status != 413 else
                       f"the request body is larger than {request.app[SETTINGS].max_body_bytes} bytes")
        return web.json_response(err.body(), status=exc.status)
    except EngineError as exc:  # the engine failed the request (or stopped): said, not a traceback
        status = 503 if request.app[SETTINGS].draining else 500
        return web.json_response(ErrorReply(status, str(exc)).body(), status=status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("internal error on %s", request.path)
        return web.json_response(ErrorReply(500, f"internal error: {type(exc).__name__}: {exc}").body(), status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if request.path == "/health":
        return await handler(request)
    if settings.api_key and not key_matches(request.headers.get("Authorization", ""), settings.api_key):
        raise ErrorReply(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if settings.draining:
        raise ErrorReply(503, "the server is shutting down", headers={"Retry-After": "5"})
    return await handler(request)


def key_matches(header: str, key: str) -> bool:
    """`Bearer <key>`, the scheme in any case (RFC 9110), the key compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


# ----------------------------------------------------------------------------- routes


def ready_engine(app: web.Application) -> Engine:
    loading = app[LOADING]
    if not loading.done():
        raise ErrorReply(503, "the model is still loading", headers={"Retry-After": "5"})
    if loading.exception() is not None:
        raise ErrorReply(503, f"the model failed to load: {loading.exception()}")
    return loading.result()


async def health(request: web.Request) -> web.Response:
    if request.app[SETTINGS].draining:
        return web.json_response({"status": "stopping"}, status=503)
    loading = request.app[LOADING]
    if not loading.done():
        return web.json_response({"status": "loading"}, status=503, headers={"Retry-After": "5"})
    if loading.exception() is not None:
        return web.json_response({"status": "failed", "message": str(loading.exception())}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    card = {"id": s.model, "object": "model", "created": s.created, "owned_by": "eeyore"}
    loading = request.app[LOADING]
    if loading.done() and loading.exception() is None:
        card["max_model_len"] = loading.result().max_model_len
    return web.json_response({"object": "list", "data": [card]})


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also: integers over 4300 digits, nesting too deep
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise bad(f"the request body is not valid JSON: {reason}") from None


def check_model(request: web.Request, req: ParsedRequest) -> None:
    """A single-model server answers any `model` name (as the reference did) unless told to be
    strict; responses always carry the served name."""
    s = request.app[SETTINGS]
    if s.strict_model_name and req.model is not None and req.model != s.model:
        raise ErrorReply(404, f"the model '{req.model}' does not exist: this server serves '{s.model}'",
                       "model", "model_not_found")


def prepare(engine: Engine, prompts: list[str | list[int]] | None, messages: list[dict] | None,
            params: Any) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt and its generation budget: the tokenizing and the prompt checks,
    done once per HTTP request, off the event loop (an 8-million-character message takes seconds)."""
    try:
        if messages is not None:
            ids = [engine.encode_chat(messages, continue_final=messages[-1]["role"] == "assistant")]
        else:
            ids = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    except (TemplateError, ValueError) as exc:
        raise bad(str(exc), "messages" if messages is not None else "prompt") from None
    budgets = []
    for p in ids:
        try:
            budgets.append(engine.check_prompt(p, params))
        except InvalidRequest as exc:
            param = "messages" if messages is not None and exc.param == "prompt" else exc.param
            raise bad(str(exc), param, exc.code) from None
    return ids, budgets


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = ready_engine(request.app)
    req = parse_chat(await read_json(request), engine.defaults, request.app[SETTINGS].max_messages)
    check_model(request, req)
    prompts, budgets = await asyncio.to_thread(prepare, engine, None, req.messages, req.params)
    return await Generation(request, engine, req, prompts, budgets, chat=True).respond()


async def completions(request: web.Request) -> web.StreamResponse:
    engine = ready_engine(request.app)
    req = parse_completion(await read_json(request), engine.defaults)
    check_model(request, req)
    prompts, budgets = await asyncio.to_thread(prepare, engine, req.prompts, None, req.params)
    return await Generation(request, engine, req, prompts, budgets, chat=False).respond()


# ----------------------------------------------------------------------------- generation


class Generation:
    """The n choices of every prompt of one HTTP request, submitted together, answered as one
    body or one event stream. Choice i of prompt j has index j * n + i; with a seed, choice i
    uses seed + i, so n = 1 and the first of n choices agree."""

    def __init__(self, request: web.Request, engine: Engine, req: ParsedRequest, prompts: list[list[int]],
                 budgets: list[int], chat: bool) -> None:
        self.request, self.engine, self.req, self.prompts, self.chat = request, engine, req, prompts, chat
        self.budgets = budgets  # what check_prompt allowed each prompt to generate
        self.kind = "chat.completion" if chat else "text_completion"
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.model = request.app[SETTINGS].model
        self.queue: asyncio.Queue = asyncio.Queue()
        self.texts = [""] * (len(prompts) * req.n)
        self.tokens = [0] * len(self.texts)

    def _submit(self) -> list:
        p = self.req.params
        reqs = []
        try:
            for j, (prompt, budget) in enumerate(zip(self.prompts, self.budgets)):
                for i in range(self.req.n):
                    params = p if p.seed is None else p.updated(seed=p.seed + i)
                    reqs.append(self.engine.submit_async(prompt, params, self.queue, j * self.req.n + i,
                                                         max_tokens=budget))
        except EngineFull as exc:
            self._abort(reqs)
            raise ErrorReply(429, f"the server is busy: {exc}", headers={"Retry-After": "1"}) from None
        except EngineClosed as exc:
            self._abort(reqs)
            raise ErrorReply(503, str(exc), headers={"Retry-After": "5"}) from None
        return reqs

    def _abort(self, reqs: list) -> None:
        for r in reqs:
            if not r.done:
                self.engine.abort(r)

    async def outputs(self) -> Any:
        """Batches of (choice index, merged output) as the engine produces them."""
        left = len(self.texts)
        while left:
            batch = [await self.queue.get()]
            while not self.queue.empty():  # coalesce what piled up while we were writing
                batch.append(self.queue.get_nowait())
            merged: dict[int, Output] = {}
            for i, out in batch:
                if out.finish_reason == "error":
                    raise EngineError(out.text)
                left -= out.finish_reason is not None
                if i in merged:
                    m = merged[i]
                    out = Output(m.token_ids + out.token_ids, m.text + out.text, m.logprobs + out.logprobs,
                                 m.top_logprobs + out.top_logprobs, out.finish_reason, out.prompt_tokens, out.completion_tokens)
                merged[i] = out
            yield merged

    async def respond(self) -> web.StreamResponse:
        reqs = self._submit()
        settings = self.request.app[SETTINGS]
        settings.active += 1
        try:
            return await (self._stream() if self.req.stream else self._whole())
        finally:
            settings.active -= 1
            self._abort(reqs)

    def _usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.prompts), sum(self.tokens))

    def _logprobs(self, i: int, out: Output) -> dict[str, Any] | None:
        if not self.req.params.logprobs:
            return None
        decode = self.engine.tokenizer.decode
        texts = [decode([t]) for t in out.token_ids]
        tops = [[(decode([t]), v) for t, v in top] if top is not None else None for top in out.top_logprobs]
        if self.chat:
            return chat_logprobs(texts, out.logprobs, tops)
        return completion_logprobs(texts, out.logprobs, tops, len(self.texts[i]))

    async def _whole(self) -> web.Response:
        choices: list[dict[str, Any]] = [{} for _ in self.texts]
        logprobs: list[list[dict | None]] = [[] for _ in self.texts]
        finish: list[str | None] = [None] * len(self.texts)
        async for merged in self.outputs():
            for i, out in merged.items():
                logprobs[i].append(self._logprobs(i, out))
                self.texts[i] += out.text
                self.tokens[i] = out.completion_tokens
                finish[i] = out.finish_reason
        for i, text in enumerate(self.texts):
            lp = _join_logprobs(logprobs[i], self.chat) if self.req.params.logprobs else None
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices[i] = {"index": i, **body, "logprobs": lp, "finish_reason": finish[i]}
        return web.json_response(envelope(self.kind, self.id, self.model, choices, {"usage": self._usage()}))

    async def _stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(self.request)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if self.req.include_usage else None

        async def send(choices: list[dict[str, Any]], more: dict | None = extra) -> None:
            await resp.write(b"data: " + json.dumps(envelope(kind, self.id, self.model, choices, more)).encode() + b"\n\n")

        try:
            if self.chat:
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(len(self.texts))])
            async for merged in self.outputs():
                choices = []
                for i, out in merged.items():
                    if not out.text and out.finish_reason is None and not self.req.params.logprobs:
                        continue  # held back: nothing to show yet
                    body = {"delta": {"content": out.text} if out.text else {}} if self.chat else {"text": out.text}
                    choices.append({"index": i, **body, "logprobs": self._logprobs(i, out), "finish_reason": out.finish_reason})
                    self.texts[i] += out.text
                    self.tokens[i] = out.completion_tokens
                if choices:
                    await send(choices)
            if self.req.include_usage:
                await send([], {"usage": self._usage()})
        except EngineError as exc:
            await resp.write(b"data: " + json.dumps(ErrorReply(500, str(exc)).body()).encode() + b"\n\n")
        except ConnectionResetError:  # the client left: the caller's finally aborts the requests
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _join_logprobs(parts: list[dict | None], chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [c for p in parts if p for c in p["content"]]}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [v for p in parts if p for v in p[k]] for k in keys}
