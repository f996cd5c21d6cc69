"""Annotate: experts choose the better of two client replies; the choices are round-2 DPO records.

The queue is the `--pairs` file (the preference-pair builder's rows, whose `chosen` / `rejected`
become the two candidates, or `{"prompt": [...], "candidates": [a, b]}` rows) followed by the
items sampled live for a practice transcript's turn (`<data-dir>/annotate/live_items.jsonl`).
Each annotator sees the candidates in an order fixed per (annotator, item), so a reload shows
the same sides. A choice is appended at once to `round2_dpo.jsonl` (which `eeyore.train.dpo
--prompt_key prompt --apply_chat_template` trains on as it is); ties and skips go to
`other_labels.jsonl`. Together they are the state: an annotator resumes at the first item
they have not labelled.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from eeyore.train.data import DataError, Row, load_rows

from .agreement import pairwise
from .backends import complete
from .practice import ready_backend
from .store import append_jsonl, read_jsonl
from .web import ApiError, read_json, studio_of, who

LABELS = ("a", "b", "tie", "skip")
FLAGS = ("realistic", "consistent")  # per candidate: a realistic client? consistent with the profile?
MAX_RATIONALE = 4000


def _reply(row: Row, key: str) -> str:
    value = row.field(key)
    if isinstance(value, str):
        return value
    messages = row.messages(key)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{row.where}: field {key!r}: the last message must be the client's (assistant) reply")
    return messages[-1]["content"]


def item_of(row: Row) -> dict[str, Any]:
    """{id, prompt, candidates} of a pairs row; DataError names the row and field."""
    prompt = row.field("prompt")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else row.messages("prompt")
    if "candidates" in row.record:
        cands = row.record["candidates"]
        if not (isinstance(cands, list) and len(cands) == 2 and all(isinstance(c, str) for c in cands)):
            raise DataError(f"{row.where}: field 'candidates' must be a list of two strings")
    else:
        cands = [_reply(row, "chosen"), _reply(row, "rejected")]
    digest = hashlib.sha256(json.dumps([prompt, cands], ensure_ascii=False).encode()).hexdigest()[:16]
    return {"id": digest, "prompt": prompt, "candidates": list(cands)}


class AnnotationQueue:
    def __init__(self, pairs: str | None, folder: Path) -> None:
        self.folder = folder
        self.dpo, self.others, self.live = (folder / n for n in ("round2_dpo.jsonl", "other_labels.jsonl", "live_items.jsonl"))
        rows = load_rows(pairs) if pairs else []
        self.items: dict[str, dict[str, Any]] = {}
        for row in rows + [Row(r, f"{self.live} line {i + 1}") for i, r in enumerate(read_jsonl(self.live))]:
            item = item_of(row)
            self.items.setdefault(item["id"], item)  # a duplicate row is one item
        # annotator -> item -> canonical label (0 / 1: the candidate chosen, "tie", "skip")
        self.labels: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self.dpo) + read_jsonl(self.others):
            self.labels.setdefault(rec["annotator"], {})[rec["item"]] = rec["choice"]

    def add_live(self, prompt: list[dict[str, str]], candidates: list[str], origin: dict[str, Any]) -> dict[str, Any]:
        item = item_of(Row({"prompt": prompt, "candidates": candidates}, "live item"))
        if item["id"] not in self.items:
            append_jsonl(self.live, {"prompt": prompt, "candidates": candidates, **origin})
            self.items[item["id"]] = item
        return item

    @staticmethod
    def swapped(annotator: str, item_id: str) -> bool:
        """Whether this annotator sees candidate 1 on the left: random-looking, fixed per pair."""
        return hashlib.sha256(f"{annotator}\0{item_id}".encode()).digest()[0] & 1 == 1

    def next_item(self, annotator: str) -> dict[str, Any] | None:
        done = self.labels.get(annotator, {})
        item = next((it for it in self.items.values() if it["id"] not in done), None)
        if item is None:
            return None
        a, b = item["candidates"][::-1] if self.swapped(annotator, item["id"]) else item["candidates"]
        return {"id": item["id"], "prompt": item["prompt"], "a": a, "b": b}

    def progress(self, annotator: str) -> dict[str, int]:
        return {"done": len(self.labels.get(annotator, {})), "total": len(self.items)}

    def label(self, annotator: str, item_id: str, label: str, rationale: str, flags: dict[str, dict[str, bool]]) -> None:
        item = self.items[item_id]
        swap = self.swapped(annotator, item_id)
        # the page's left / right -> the item's candidate 0 / 1
        side = {"a": 1 if swap else 0, "b": 0 if swap else 1}
        by_candidate = {side[s]: flags.get(s, {}) for s in ("a", "b")}
        base = {"item": item_id, "annotator": annotator, "rationale": rationale, "time": time.time()}
        if label in ("a", "b"):
            win = side[label]
            c = item["candidates"]
            append_jsonl(self.dpo, {
                "prompt": item["prompt"], "chosen": [{"role": "assistant", "content": c[win]}],
                "rejected": [{"role": "assistant", "content": c[1 - win]}], **base, "choice": win,
                "flags": {"chosen": by_candidate[win], "rejected": by_candidate[1 - win]}})
            choice: Any = win
        else:
            choice = label
            append_jsonl(self.others, {**base, "choice": label, "prompt": item["prompt"], "candidates": item["candidates"],
                                       "flags": {"candidate_0": by_candidate[0], "candidate_1": by_candidate[1]}})
        self.labels.setdefault(annotator, {})[item_id] = choice

    def summary(self, annotators: list[str]) -> dict[str, Any]:
        names = sorted(set(annotators) | set(self.labels))
        rows = []
        for name in names:
            done = self.labels.get(name, {})
            count = lambda pred: sum(1 for v in done.values() if pred(v))  # noqa: E731
            rows.append({"name": name, "done": len(done), "chosen": count(lambda v: v in (0, 1)),
                         "ties": count(lambda v: v == "tie"), "skips": count(lambda v: v == "skip")})
        decided = {n: {i: v for i, v in self.labels.get(n, {}).items() if v != "skip"} for n in names}
        return {"total": len(self.items), "annotators": rows, "pairs": pairwise(decided)}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/annotate/next", next_item)
    r.add_post("/api/annotate/label", label)
    r.add_get("/api/annotate/summary", summary)
    r.add_post("/api/annotate/sample", sample)


def _next(queue: AnnotationQueue, name: str) -> dict[str, Any]:
    return {"who": name, "item": queue.next_item(name), "progress": queue.progress(name)}


async def next_item(request: web.Request) -> web.Response:
    return web.json_response(_next(studio_of(request).queue, who(request)))


def _flags(raw: Any) -> dict[str, dict[str, bool]]:
    raw = raw if isinstance(raw, dict) else {}
    out = {}
    for side in ("a", "b"):
        given = raw.get(side) if isinstance(raw.get(side), dict) else {}
        out[side] = {f: bool(given.get(f, False)) for f in FLAGS}
    return out


async def label(request: web.Request) -> web.Response:
    """`{"item": id, "label": "a"|"b"|"tie"|"skip", "rationale": str, "flags": {"a": {...}, "b": {...}}}`."""
    queue = studio_of(request).queue
    name = who(request)
    body = await read_json(request)
    item_id, choice, rationale = body.get("item"), body.get("label"), body.get("rationale", "")
    if item_id not in queue.items:
        raise ApiError(404, "no such item in the queue")
    if choice not in LABELS:
        raise ApiError(400, f"'label' must be one of {', '.join(LABELS)}")
    if not isinstance(rationale, str) or len(rationale) > MAX_RATIONALE:
        raise ApiError(400, f"'rationale' must be text of at most {MAX_RATIONALE} characters")
    if item_id in queue.labels.get(name, {}):
        raise ApiError(409, "you have already labelled this item")
    queue.label(name, item_id, choice, rationale.strip(), _flags(body.get("flags")))
    return web.json_response(_next(queue, name))


async def summary(request: web.Request) -> web.Response:
    who(request)  # annotators only
    studio = studio_of(request)
    return web.json_response(studio.queue.summary(studio.annotators))


async def sample(request: web.Request) -> web.Response:
    """Queue two candidates sampled now for a practice transcript's client turn:
    `{"session": id, "turn": k}` (the k-th client reply, from 1; its conversation so far is the prompt)."""
    backend = ready_backend(request)
    studio = studio_of(request)  # trainees queue items without signing in: the page is theirs
    body = await read_json(request)
    sid, k = body.get("session"), body.get("turn")
    transcript = studio.practice.load(sid if isinstance(sid, str) else "")
    replies = [j for j, m in enumerate(transcript["messages"]) if m["role"] == "assistant"]
    if not isinstance(k, int) or not 1 <= k <= len(replies):
        raise ApiError(400, f"'turn' must be a client turn of the session, 1..{len(replies)}")
    prompt = [{"role": m["role"], "content": m["content"]} for m in transcript["messages"][:replies[k - 1]]]
    settings = transcript["settings"]
    try:
        candidates = await asyncio.gather(complete(backend, prompt, settings), complete(backend, prompt, settings))
    except Exception as exc:
        raise ApiError(502, f"sampling the candidates failed: {exc}") from None
    item = studio.queue.add_live(prompt, list(candidates), {"session": transcript["id"], "turn": k})
    return web.json_response({"item": item["id"], "total": len(studio.queue.items)})
