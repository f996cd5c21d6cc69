"""The studio's aiohttp application: the three pages' routes behind the session middleware."""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from . import annotate, practice, profile_review
from .web import PAGES, SESSIONS, STATIC, STUDIO, TOKENS, guard, session_info, sign_in, sign_out


def create_app(studio: Any, annotator_tokens: dict[str, str] | None) -> web.Application:
    """`studio` holds the pages' state (see __main__.Studio); `annotator_tokens` name -> token,
    None when anyone may annotate as 'local'."""
    app = web.Application(middlewares=[guard], client_max_size=2 * 2**20)
    app[STUDIO], app[SESSIONS], app[TOKENS] = studio, {}, annotator_tokens
    app.router.add_get("/", to_practice)
    for path, name in PAGES.items():
        app.router.add_get(path, _page(name))
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.router.add_get("/api/session", session_info)
    app.router.add_post("/api/signin", sign_in)
    app.router.add_post("/api/signout", sign_out)
    for module in (practice, annotate, profile_review):
        module.add_routes(app)

    async def start(app: web.Application) -> None:
        studio.loading = asyncio.get_running_loop().run_in_executor(None, studio.backend.load)

    async def stop(app: web.Application) -> None:
        await studio.shutdown()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def to_practice(request: web.Request) -> web.Response:
    raise web.HTTPFound("/practice")


def _page(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name)
    return handler
