"""Studio under load: simulated trainees chatting at once through the Practice page's API.

    python bench/studio_bench.py                      # 8 trainees x 3 turns, the embedded model

Each trainee is its own browser session (cookie + CSRF token): it starts a practice session on
a sample profile and sends its turns one after another, reading the streamed reply, all
trainees at the same time. Reported: time to first token (request sent -> first reply text)
p50 / p99 over every turn, whole-turn time, and whether every turn is in the saved
transcripts. Side by side: the same conversations streamed straight from the same in-process
engine (no HTTP, no studio), at the same concurrency; the ratio is the studio's overhead.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eeyore.studio.__main__ import build, parse_args as studio_args  # noqa: E402
from eeyore.studio.backends import EngineBackend  # noqa: E402
from eeyore.studio.schema import load_records, system_prompt  # noqa: E402
from eeyore.studio.web import STUDIO  # noqa: E402

LINES = ["Hi, thanks for coming in. What has been on your mind this week?",
         "That sounds hard. How have you been sleeping?",
         "What do you usually do when it gets like that?",
         "Who do you talk to when things are bad?"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]  # nearest rank


async def trainee(url: str, i: int, turns: int, max_tokens: int, ttft: list, turn_s: list, first_ttft: list) -> tuple[str, list[str], list[str]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # cookies for an IP host
        csrf = (await (await http.get(f"{url}/api/session")).json())["csrf"]
        headers = {"X-CSRF-Token": csrf}
        profiles = (await (await http.get(f"{url}/api/practice/profiles")).json())["profiles"]
        body = {"record": profiles[i % len(profiles)]["record"], "settings": {"max_tokens": max_tokens}}
        started = await http.post(f"{url}/api/practice/sessions", json=body, headers=headers)
        started.raise_for_status()
        sid = (await started.json())["id"]
        sent, replies = [], []
        for t in range(turns):
            text = LINES[t % len(LINES)]
            start, first, reply = time.perf_counter(), None, ""
            async with http.post(f"{url}/api/practice/sessions/{sid}/turns", json={"content": text}, headers=headers) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    msg = json.loads(line)
                    if "error" in msg:
                        raise RuntimeError(msg["error"])
                    if msg.get("delta") and first is None:
                        first = time.perf_counter() - start
                    reply += msg.get("delta", "")
            ttft.append(first if first is not None else time.perf_counter() - start)
            if t == 0:
                first_ttft.append(ttft[-1])
            turn_s.append(time.perf_counter() - start)
            sent.append(text)
            replies.append(reply)
        return sid, sent, replies


async def direct(model: str | None, trainees: int, max_tokens: int, ttft: list) -> None:
    """The trainees' first turns straight from an engine of its own (a fresh cache, as the
    studio's has for first turns), all at once."""
    backend = EngineBackend(model)
    await asyncio.get_running_loop().run_in_executor(None, backend.load)
    settings = {**backend.defaults(), "max_tokens": max_tokens}
    records = load_records(None)
    conversations = [[{"role": "system", "content": system_prompt(records[i % len(records)])},
                      {"role": "user", "content": LINES[0]}] for i in range(trainees)]

    async def one(messages: list[dict]) -> None:
        start = time.perf_counter()
        async for delta in backend.stream(messages, settings):
            if delta:
                ttft.append(time.perf_counter() - start)
                break

    try:
        await asyncio.gather(*(one(m) for m in conversations))
    finally:
        backend.close()


async def run(args: argparse.Namespace) -> int:
    base: list[float] = []
    await direct(args.model, args.trainees, args.max_tokens, base)
    data = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    app, _ = build(studio_args(["--data-dir", str(data)] + (["--model", args.model] if args.model else [])))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    studio = app[STUDIO]
    try:
        await studio.loading
        ttft, turn_s, first = [], [], []
        wall = time.perf_counter()
        results = await asyncio.gather(*(trainee(url, i, args.turns, args.max_tokens, ttft, turn_s, first)
                                         for i in range(args.trainees)))
        wall = time.perf_counter() - wall
        lost = 0
        for sid, sent, replies in results:  # every turn the trainee saw is in the saved transcript
            saved = [(m["role"], m["content"]) for m in studio.practice.load(sid)["messages"][1:]]
            expected = [pair for s, r in zip(sent, replies) for pair in (("user", s), ("assistant", r))]
            lost += sum(1 for a, b in zip(expected, saved) if a != b) + max(0, len(expected) - len(saved))
    finally:
        await runner.cleanup()
    n = len(ttft)
    print(f"studio_bench: {args.trainees} trainees x {args.turns} turns at once, max_tokens {args.max_tokens}, "
          f"model {args.model or 'embedded SmolLM2-135M'}; wall {wall:.1f} s")
    print(f"  studio, every turn   TTFT p50 {pct(ttft, 50):.3f} s  p99 {pct(ttft, 99):.3f} s  (n={n}); "
          f"whole turn p50 {pct(turn_s, 50):.2f} s  p99 {pct(turn_s, 99):.2f} s")
    print(f"  studio, first turns  TTFT p50 {pct(first, 50):.3f} s  p99 {pct(first, 99):.3f} s  (n={len(first)})")
    print(f"  engine, first turns  TTFT p50 {pct(base, 50):.3f} s  p99 {pct(base, 99):.3f} s  (n={len(base)}, no HTTP)")
    print(f"  ratio studio / engine, first-turn TTFT p50: {pct(first, 50) / max(pct(base, 50), 1e-9):.2f}")
    print(f"  transcript turns lost: {lost} of {2 * n}")
    return 1 if lost else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainees", type=int, default=8, help="trainees chatting at once (default 8)")
    p.add_argument("--turns", type=int, default=3, help="turns per trainee (default 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length cap (default 64)")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
