"""Wall time and requests/s of one evaluation pass at concurrency 1 (how the reference evaluated:
one request at a time) and at 16, against the project's server on the embedded default model.

    python bench/eval_bench.py                                   # every profile, every trait
    python bench/eval_bench.py --max-traits 2 --max-tokens 32    # a shorter pass for 2 CPU cores
    python bench/eval_bench.py --server-url http://127.0.0.1:6416/v1 --model NAME   # a running server
    python bench/eval_bench.py --simulated-latency 0.5   # a remote API: fixed latency per request

Both passes run in this process against the same server, one after the other, each with a
fresh output directory (nothing cached). Sampling is greedy by default so that both passes
generate the same replies and do the same work. The server also plays the judge.
--simulated-latency replaces the model by an in-process endpoint that answers every request after
a fixed delay, as a hosted API (GPT-4o judge and baselines) does: it measures the evaluator's own
concurrency, independent of how well the model server batches.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from aiohttp import web

from eeyore.eval.judge import JUDGE_SYSTEM
from eeyore.eval.runner import EvalConfig, Runner

# The reference's 12 test profiles where the CI machine keeps them beside the checkout (the
# published figures use them); anywhere else, the sample profiles shipped with eeyore.
REAL = Path(__file__).resolve().parents[2] / "shared/data/eeyore_test_profiles.json"


def start_server(model: str | None, batch: int, threads: int | None, log: Path) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "eeyore.serve", "--port", str(port), "--max-batch-size", str(batch),
           "--served-model-name", "bench"]
    cmd += ["--model", model] if model else []
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url + "/v1", "bench"
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"the server did not become healthy in 10 minutes; see {log}")


def start_latency_endpoint(latency_s: float) -> str:
    """An endpoint on a background thread that sleeps latency_s, then gives a fixed reply."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(latency_s)
        text = "4" if body["messages"][0]["content"] == JUDGE_SYSTEM else "i don't know. it's been hard lately."
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}],
                                  "usage": {"completion_tokens": 8}})

    ready: dict[str, str] = {}
    started = threading.Event()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        ready["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        started.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    started.wait()
    return ready["url"]


def one_pass(args: argparse.Namespace, url: str, model: str, concurrency: int, out: Path) -> dict:
    cfg = EvalConfig(
        experiment="eeyore", model=model, base_url=url, temperature=args.temperature, top_p=1.0,
        max_tokens=args.max_tokens, judge_model=model, judge_base_url=url, judge_max_tokens=args.judger_max_tokens,
        profiles=args.profiles, end_index=args.end_index, max_traits=args.max_traits, concurrency=concurrency,
        output_dir=str(out), run_name=f"c{concurrency}",
    )
    results = asyncio.run(Runner(cfg).run())
    if results["sessions"]["failed"]:
        sys.exit(f"concurrency {concurrency}: {results['failures'][0]['error']}")
    return results["timing"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=str(REAL) if REAL.is_file() else None,
                   help="profiles file (default: the reference's 12 test profiles where the machine has them, "
                        "else the sample profiles shipped with eeyore)")
    p.add_argument("--end-index", type=int, default=None, help="only the first N profiles (default: all)")
    p.add_argument("--max-traits", type=int, default=None, help="interview at most N traits per profile (default: all)")
    p.add_argument("--max-tokens", type=int, default=32, help="max tokens per client reply (default 32)")
    p.add_argument("--judger-max-tokens", type=int, default=4, help="max tokens per judge answer (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="client sampling temperature (default 0: greedy)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels; the first is the baseline")
    p.add_argument("--server-url", default=None, help="use this running server instead of starting one")
    p.add_argument("--model", default=None, help="with --server-url: its model name; otherwise: the checkpoint "
                   "to serve (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-batch-size", type=int, default=16, help="server batch size when started here (default 16)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads when started here")
    p.add_argument("--simulated-latency", type=float, default=None, metavar="SECONDS",
                   help="no model: an in-process endpoint answers each request after SECONDS (a hosted API)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.simulated_latency is not None:
            url, model = start_latency_endpoint(args.simulated_latency), "latency"
        elif args.server_url:
            url, model = args.server_url, args.model or "eeyore"
        else:
            proc, url, model = start_server(args.model, args.max_batch_size, args.threads, Path(tmp) / "server.log")
        try:
            timings = {c: one_pass(args, url, model, c, Path(tmp) / f"c{c}") for c in levels}
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)

    base = timings[levels[0]]
    server = f"simulated {args.simulated_latency} s latency" if args.simulated_latency is not None else url
    print(f"\nserver {server}; profiles {args.profiles or 'the shipped samples'} (first {args.end_index or 'all'}), traits/profile {args.max_traits or 'all'}, "
          f"max_tokens {args.max_tokens}, judge max_tokens {args.judger_max_tokens}, temperature {args.temperature}")
    print(f"{'concurrency':>11} {'sessions':>8} {'requests':>8} {'tokens':>7} {'wall s':>8} {'req/s':>7} {'tok/s':>7} {'speedup':>7}")
    for c, t in timings.items():
        print(f"{c:>11} {t['sessions_run']:>8} {t['requests']:>8} {t['completion_tokens']:>7} {t['wall_s']:>8.1f} "
              f"{t['requests_per_s']:>7.2f} {t['completion_tokens'] / t['wall_s']:>7.1f} {base['wall_s'] / t['wall_s']:>6.2f}x")


if __name__ == "__main__":
    main()
