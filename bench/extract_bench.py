"""Profile extraction throughput (conversations/s) at concurrency 1 and 16 against the project's
server on the embedded default model, and the agreement of what it extracted with the gold
profiles of the 12 shared conversations.

    python bench/extract_bench.py                                   # starts `python -m eeyore.serve`
    python bench/extract_bench.py --limit 3                         # a shorter pass for 2 CPU cores
    python bench/extract_bench.py --server-url http://127.0.0.1:6416/v1 --model NAME   # a running server

Both passes run one after the other against the same server, each into a fresh output (nothing
resumed), greedy, so they ask for the same work; the speed-up is the first level's wall time over
each level's. There is no released reference extraction to compare with: the baseline is the
one-request-at-a-time pass. The server follows the profile's JSON schema by constrained decoding
(`response_format`), so replies are schema-valid JSON unless --max-tokens cuts them; the embedded
135M model is still far too weak for the task, so its agreement table is a floor, not a measure
of the method.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from eval_bench import start_server  # the same way of starting our server as the evaluation bench

from eeyore.data import agreement, extract_profiles
from eeyore.data.conversations import load_profile_records

SHARED = Path(__file__).resolve().parents[2] / "shared/data/eeyore_test_profiles.json"


def one_pass(args: argparse.Namespace, url: str, model: str, concurrency: int, out: Path) -> tuple[float, object]:
    flags = [str(args.conversations), "--output", str(out), "--base-url", url, "--model", model, "--attempts",
             str(args.attempts), "--concurrency", str(concurrency), "--max-tokens", str(args.max_tokens),
             "--temperature", "0"]
    flags += ["--max-samples", str(args.limit)] if args.limit else []
    start = time.perf_counter()
    stats = asyncio.run(extract_profiles.run(extract_profiles.parse_args(flags)))
    return time.perf_counter() - start, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=Path, default=SHARED, help="conversations with gold profiles (default: the 12 shared ones)")
    p.add_argument("--limit", type=int, default=None, help="only the first N conversations (default: all)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels; the first is the baseline")
    p.add_argument("--attempts", type=int, default=1, help="requests per conversation (default 1: the speed of one pass)")
    p.add_argument("--max-tokens", type=int, default=2048, help="longest reply in tokens (default 2048, as "
                   "extract_profiles: a guided profile with its evidence takes 1000-2000)")
    p.add_argument("--server-url", default=None, help="use this running server instead of starting one")
    p.add_argument("--model", default=None, help="with --server-url: its model name; otherwise: the checkpoint "
                   "to serve (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-batch-size", type=int, default=16, help="server batch size when started here (default 16)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads when started here")
    args = p.parse_args()
    if not args.conversations.is_file():
        sys.exit(f"{args.conversations} not found (the shared test profiles); pass --conversations")
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.server_url:
            url, model = args.server_url, args.model or "default"
        else:
            proc, url, model = start_server(args.model, args.max_batch_size, args.threads, Path(tmp) / "server.log")
        try:
            runs = {c: one_pass(args, url, model, c, Path(tmp) / f"c{c}.jsonl") for c in levels}
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
        last = Path(tmp) / f"c{levels[-1]}.jsonl"
        predicted = {k: r["profile"] for k, r in load_profile_records(last).items()} if last.stat().st_size else {}
        rejects = [json.loads(line) for line in (Path(tmp) / f"c{levels[-1]}.rejects.jsonl").read_text().splitlines()]
    gold = {k: r["profile"] for k, r in load_profile_records(args.conversations).items()}
    if args.limit:
        gold = dict(list(gold.items())[: args.limit])

    base = runs[levels[0]][0]
    print(f"\nserver {url} ({model}); {len(gold)} conversations from {args.conversations}; attempts {args.attempts}, "
          f"max_tokens {args.max_tokens}, greedy")
    print(f"{'concurrency':>11} {'valid':>5} {'rejected':>8} {'requests':>8} {'tokens':>7} {'wall s':>8} {'conv/s':>7} {'tok/s':>7} {'speedup':>7}")
    for c, (wall, s) in runs.items():
        print(f"{c:>11} {s.written:>5} {s.rejected:>8} {s.requests:>8} {s.completion_tokens:>7} {wall:>8.1f} "
              f"{(s.written + s.rejected) / wall:>7.3f} {s.completion_tokens / wall:>7.1f} {base / wall:>6.2f}x")
    rows, missing = agreement.agreement(predicted, gold)
    print(f"\nagreement of the concurrency-{levels[-1]} pass with gold (a floor: a 135M model):\n")
    print(agreement.markdown(rows, len(gold) - missing, missing, len(set(predicted) - set(gold))))
    reasons = [r["reason"][:100] for r in rejects[:3]]
    if reasons:
        print("first reasons for rejection:\n  " + "\n  ".join(reasons))


if __name__ == "__main__":
    main()
