"""The studio's HTTP ground: browser sessions, CSRF, sign-in, security headers, JSON bodies.

The pages (`practice.py`, `annotate.py`, `profile_review.py`) build on these helpers, and
`app.py` puts the pages and this middleware together into one application.

Every browser gets a session cookie (HttpOnly, SameSite=Strict) and a per-session CSRF token
that each POST must echo in `X-CSRF-Token`; state changes only by POST. Annotators sign in with
the token `--annotators` made for them, compared in constant time. Pages are static files whose
scripts put every model and user string into the page with `textContent`; the Content Security
Policy forbids inline and foreign scripts as a second line of defence.
"""
from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

STATIC = Path(str(resources.files("eeyore.studio") / "static"))
COOKIE = "studio_session"
LOCAL = "local"  # the one annotator when --annotators is not given
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
PAGES = {"/practice": "practice.html", "/annotate": "annotate.html", "/annotate/summary": "summary.html",
         "/profiles": "profiles.html"}


@dataclass
class BrowserSession:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    who: str | None = None  # the signed-in annotator


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


STUDIO = web.AppKey("studio", object)
SESSIONS = web.AppKey("sessions", dict)
TOKENS = web.AppKey("tokens", dict)
SESSION = web.RequestKey("session", BrowserSession)


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    sid = request.cookies.get(COOKIE, "")
    fresh = sid not in sessions
    if fresh:
        sid = secrets.token_urlsafe(32)
        sessions[sid] = BrowserSession()
    request[SESSION] = sessions[sid]
    try:
        if request.method not in ("GET", "HEAD"):
            sent = request.headers.get("X-CSRF-Token", "")
            if fresh or not hmac.compare_digest(sent.encode(), request[SESSION].csrf.encode()):
                raise ApiError(403, "missing or stale CSRF token: reload the page")
        resp = await handler(request)
    except ApiError as exc:
        resp = web.json_response({"error": str(exc)}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = web.json_response({"error": exc.reason}, status=exc.status)
    if fresh:
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/")
    if not resp.prepared:  # streamed replies set their headers themselves (see `secure_headers`)
        secure_headers(resp)
    return resp


def secure_headers(resp: web.StreamResponse) -> None:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers.setdefault("Cache-Control", "no-store")


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def studio_of(request: web.Request) -> Any:
    return request.app[STUDIO]


def who(request: web.Request) -> str:
    """The signed-in annotator (or 'local' when the studio has no annotator list)."""
    if request.app[TOKENS] is None:
        return LOCAL
    name = request[SESSION].who
    if name is None:
        raise ApiError(401, "sign in first (name and the token you were given)")
    return name


async def session_info(request: web.Request) -> web.Response:
    studio = studio_of(request)
    tokens = request.app[TOKENS]
    return web.json_response({"csrf": request[SESSION].csrf, "who": request[SESSION].who if tokens else LOCAL,
                              "sign_in": tokens is not None, "backend": studio.backend.label})


async def sign_in(request: web.Request) -> web.Response:
    tokens = request.app[TOKENS]
    if tokens is None:
        return web.json_response({"who": LOCAL})
    body = await read_json(request)
    name, token = body.get("name"), body.get("token")
    if not isinstance(name, str) or not isinstance(token, str):
        raise ApiError(400, "send 'name' and 'token'")
    expected = tokens.get(name, secrets.token_urlsafe(32))  # unknown names cost the same comparison
    if not (hmac.compare_digest(token.encode(), expected.encode()) and name in tokens):
        raise ApiError(403, "unknown annotator or wrong token")
    request[SESSION].who = name
    return web.json_response({"who": name})


async def sign_out(request: web.Request) -> web.Response:
    request[SESSION].who = None
    return web.json_response({"who": None})
