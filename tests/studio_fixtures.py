"""The studio on a free port with a scripted OpenAI-compatible endpoint, and headless Chromium.

The scripted endpoint streams fixed replies in small chunks, so the browser tests are fast and
know what the client will say. Browser tests skip when Playwright or Debian's `chromium` is
missing, unless EEYORE_REQUIRE_BROWSER=1 (set by .ci/run), where they fail instead.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from aiohttp import web

from eeyore.studio.__main__ import build, parse_args
from eeyore.studio.web import STUDIO


class ScriptedOpenAI:
    """`/v1/chat/completions` streaming `replies` in turn (then the last one again)."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.requests = list(replies), []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        text = self.replies[min(len(self.requests), len(self.replies)) - 1]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(text), 7):
            chunk = {"choices": [{"index": 0, "delta": {"content": text[i:i + 7]}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.005)
        await resp.write(b"data: [DONE]\n\n")
        return resp


class Served:
    """aiohttp apps served from one background event loop; `urls[i]` is app i's base URL."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def close(self) -> None:
        async def stop() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_studio(served: Served, data_dir: Path, *flags: str, replies: list[str] | None = None) -> tuple[str, object]:
    """The studio against a scripted endpoint (or the flags' own backend when `replies` is None)."""
    fake = None
    if replies is not None:
        fake = ScriptedOpenAI(replies)
        flags = ("--base-url", served.serve(fake.app) + "/v1", *flags)
    app, _ = build(parse_args(["--data-dir", str(data_dir), *flags]))
    url = served.serve(app)
    studio = app[STUDIO]
    served.run(_loaded(studio))
    return url, fake


async def _loaded(studio) -> None:
    await studio.loading  # raises what loading the model raised


def chromium_or_skip():
    """A launched headless Chromium, or skip (fail under EEYORE_REQUIRE_BROWSER=1) saying why."""
    def missing(reason: str):
        if os.environ.get("EEYORE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EEYORE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        missing("no chromium executable on PATH (apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
    except Exception as exc:
        pw.stop()
        missing(f"chromium at {exe} did not start: {str(exc).splitlines()[0]}")
    return pw, browser
