"""Profiles: experts check an extracted profile against the conversation it came from.

Every decision (edited, accepted, rejected) is appended to `<data-dir>/profiles/versions.jsonl`
as a new version of the whole record, with who made it and when; the newest version is the
profile's current state. Edits and acceptances are validated with the profile schema the
trainers and the evaluator use; the export is the evaluator's profiles file format.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from .schema import ProfileError, check_record
from .store import append_jsonl, read_jsonl
from .web import ApiError, read_json, studio_of, who

DECISIONS = ("edited", "accepted", "rejected")


class ReviewBook:
    def __init__(self, records: list[dict[str, Any]], folder: Path) -> None:
        self.originals = records
        self.log = folder / "versions.jsonl"
        self.versions: dict[str, list[dict[str, Any]]] = {}
        for v in read_jsonl(self.log):
            if v.get("key") in self.keys():
                self.versions.setdefault(v["key"], []).append(v)

    def keys(self) -> list[str]:
        return [str(i) for i in range(len(self.originals))]

    def label(self, key: str) -> str:
        r = self.originals[int(key)]
        names = [str(r[k]) for k in ("source", "id_source") if r.get(k) is not None]
        return f"profile {key}" + (f" ({' '.join(names)})" if names else "")

    def record(self, key: str) -> dict[str, Any]:
        versions = self.versions.get(key)
        return versions[-1]["record"] if versions else self.originals[int(key)]

    def status(self, key: str) -> str:
        versions = self.versions.get(key)
        return versions[-1]["decision"] if versions else "pending"

    def current(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(key, label, newest record) of every profile not rejected."""
        return [(k, self.label(k), self.record(k)) for k in self.keys() if self.status(k) != "rejected"]

    def decide(self, key: str, decision: str, record: dict[str, Any], by: str) -> dict[str, Any]:
        version = {"key": key, "version": len(self.versions.get(key, [])) + 1, "decision": decision,
                   "by": by, "time": time.time(), "record": record}
        append_jsonl(self.log, version)
        self.versions.setdefault(key, []).append(version)
        return version

    def accepted(self) -> list[dict[str, Any]]:
        return [self.record(k) for k in self.keys() if self.status(k) == "accepted"]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/profiles", list_profiles)
    app.router.add_post("/api/profiles/{key}/decision", decide)
    app.router.add_get("/api/profiles/export", export)


def _key(request: web.Request, book: ReviewBook) -> str:
    key = request.match_info["key"]
    if key not in book.keys():
        raise ApiError(404, "no such profile")
    return key


def _summary(book: ReviewBook, key: str) -> dict[str, Any]:
    history = [{k: v[k] for k in ("version", "decision", "by", "time")} for v in book.versions.get(key, [])]
    return {"key": key, "label": book.label(key), "status": book.status(key), "record": book.record(key),
            "history": history}


async def list_profiles(request: web.Request) -> web.Response:
    who(request)  # reviewers only
    book = studio_of(request).reviews
    return web.json_response({"profiles": [_summary(book, k) for k in book.keys()]})


async def decide(request: web.Request) -> web.Response:
    """Save a new version: `{"decision": "edited"|"accepted"|"rejected", "record": {...}}`.
    A rejected profile keeps its record as it was; the others must follow the schema."""
    book = studio_of(request).reviews
    key = _key(request, book)
    by = who(request)
    body = await read_json(request)
    decision = body.get("decision")
    if decision not in DECISIONS:
        raise ApiError(400, f"'decision' must be one of {', '.join(DECISIONS)}")
    record = book.record(key) if decision == "rejected" else body.get("record")
    if decision != "rejected":
        try:
            check_record(record)
        except ProfileError as exc:  # `errors`: one entry per broken field, for the page to mark
            return web.json_response({"error": "; ".join(exc.errors), "errors": exc.errors}, status=422)
    book.decide(key, decision, record, by)
    return web.json_response(_summary(book, key))


async def export(request: web.Request) -> web.Response:
    body = json.dumps(studio_of(request).reviews.accepted(), ensure_ascii=False, indent=1)
    return web.Response(text=body, content_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="accepted_profiles.json"'})
