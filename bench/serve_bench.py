"""Load test: our server against a reference-style baseline, at rising numbers of concurrent streams.

    python bench/serve_bench.py [--levels 1 4 16 64] [--max-tokens 64]
    python bench/serve_bench.py --natural --levels 16 --requests 32   # replies end where the model ends them

Each server runs in its own process, one after the other, on the embedded default model with
the reference's sampling flags (temperature 1.0, top-p 0.8, eos bias -4, length decay 0 1.01).
The baseline serves as the reference did: one request at a time through transformers
`generate` (streamed through a `generate` streamer so time to first token is comparable).
Every request asks for exactly --max-tokens tokens (`ignore_eos`, `min_new_tokens` for the
baseline) so both sides produce the same work; with --natural each reply instead ends where the
sampled end-of-turn token ends it (as the reference served, the length penalty making that ever
likelier), up to --max-tokens (default then 1024), and the two sides' mean reply lengths are
printed beside their throughput, since sampling makes them differ. A level with c streams sends max(c, --requests)
chat requests from c concurrent clients and reports requests/s, output tokens/s, time to
first token p50/p99 and time per output token p50; the last table gives our/baseline ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

OPENERS = [  # short counselling-session turns: the prompts of a supporter talking to the client
    "Hi, thanks for coming in today. How have you been feeling this week?",
    "You mentioned work has been hard lately. Can you tell me more about that?",
    "How have you been sleeping recently?",
    "What does a typical day look like for you right now?",
    "Is there anyone you feel you can talk to about this?",
    "What would you like to get out of our conversations?",
    "When did you first notice feeling this way?",
    "What usually helps, even a little, when things get heavy?",
]
SYSTEM = "You are a client in a counselling session. Reply briefly and honestly."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the baseline server


def run_baseline_server(port: int, threads: int | None, dtype: str = "float32") -> None:
    """One request at a time through transformers `generate`, like the reference server."""
    import torch
    import transformers
    from aiohttp import web

    if threads:
        torch.set_num_threads(threads)

    from eeyore.model.lookup import default_model_dir

    model_dir = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    eos = tok.eos_token_id
    lock = asyncio.Lock()

    class QueueStreamer(transformers.generation.streamers.BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate hands the prompt over first
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        n = body.get("max_tokens", 64)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async with lock:  # the reference served one request at a time
            queue: asyncio.Queue = asyncio.Queue()
            kwargs = dict(**ids, do_sample=True, temperature=1.0, top_p=0.8, max_new_tokens=n,
                          min_new_tokens=n if body.get("ignore_eos") else 0, sequence_bias=[[[eos], -4.0]],
                          exponential_decay_length_penalty=(0, 1.01), streamer=QueueStreamer(asyncio.get_running_loop(), queue))
            job = asyncio.get_running_loop().run_in_executor(None, lambda: model.generate(**kwargs))
            count = 0
            while (tokens := await queue.get()) is not None:
                count += len(tokens)
                chunk = {"choices": [{"index": 0, "delta": {"content": tok.decode(tokens)}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await job
        usage = {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": count}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# ----------------------------------------------------------------------------- the load generator


@dataclass
class Result:
    ttft: float
    tpot: float | None
    tokens: int


async def one_request(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int, natural: bool) -> Result:
    body = {"model": "bench", "messages": [{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": OPENERS[i % len(OPENERS)]}],
            "max_tokens": max_tokens, "ignore_eos": not natural, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = first or now
                last = now
    ttft = (first or time.perf_counter()) - start
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Result(ttft, tpot, tokens)


async def run_level(url: str, streams: int, requests: int, max_tokens: int, natural: bool, bar: tqdm) -> dict[str, float]:
    todo = iter(range(requests))
    results: list[Result] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for i in todo:  # clients share one iterator: each takes the next request when free
            results.append(await one_request(session, url, i, max_tokens, natural))
            bar.update(1)

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=streams)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(streams)))
        wall = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    tpots = [r.tpot for r in results if r.tpot is not None]
    return {
        "req/s": len(results) / wall,
        "out tok/s": sum(r.tokens for r in results) / wall,
        "TTFT p50 s": statistics.median(ttfts),
        "TTFT p99 s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "TPOT p50 ms": 1000 * statistics.median(tpots) if tpots else float("nan"),
        "mean len": statistics.mean(r.tokens for r in results),
    }


def start_server(cmd: list[str], port: int, ready_within: float = 1800.0) -> subprocess.Popen:
    """The server process once /health answers 200 (`ready_within` seconds at most: a compiling
    start takes minutes); if it exits, hangs or is interrupted first, it is stopped and the
    error names the last line it wrote."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Drained from the start: a server that fills the pipe while it starts (a compiler's output)
    # blocks in its next log write, and its /health with it. The last lines name a failure.
    tail: collections.deque[str] = collections.deque(maxlen=20)
    threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True).start()
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + ready_within

    async def wait_ready() -> None:
        async with aiohttp.ClientSession() as session:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not ready within {ready_within:.0f} s")
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        time.sleep(0.5)  # the drain thread reads what the server wrote last
        lines = [line.rstrip() for line in tail if line.strip()]
        # the last line first: it names the cause (a one-line report keeps only the first)
        raise RuntimeError(f"server exited with {proc.returncode}: {lines[-1] if lines else 'no output'}\n" + "\n".join(lines[-20:]))

    try:
        asyncio.run(wait_ready())
    except BaseException:  # an interrupt too: never leave a server behind
        proc.kill()
        proc.wait()
        raise
    return proc


def measure(name: str, url: str, streams: int, args: argparse.Namespace) -> dict[str, float]:
    n = max(streams, args.requests)
    with tqdm(total=n, desc=f"{name} c={streams}", unit="req", leave=False) as bar:
        out = asyncio.run(run_level(url, streams, n, args.max_tokens, args.natural, bar))
    print(f"{name:>8} c={streams:<3} " + "  ".join(f"{k} {v:8.2f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent streams per level (default 1 4 16 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="output tokens per request (default 64; with --natural the most a reply may take, default 1024)")
    p.add_argument("--natural", action="store_true",
                   help="replies stop where the model samples end-of-turn (no ignore_eos), as in real use")
    p.add_argument("--requests", type=int, default=4, help="requests per level at least (default 4)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both servers' dtype (default float32; bfloat16 wants a CPU with bf16 instructions)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both servers (default: torch's choice)")
    p.add_argument("--skip-baseline", action="store_true", help="measure our server only")
    p.add_argument("--compile", action="store_true",
                   help="our server with --compile (its first steps compile: minutes on CPU, before measuring)")
    p.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)  # internal: run the baseline
    args = p.parse_args()
    if args.max_tokens is None:
        args.max_tokens = 1024 if args.natural else 64
    if args.baseline_server is not None:
        return run_baseline_server(args.baseline_server, args.threads, args.dtype)

    flags = ["--temperature", "1.0", "--top-p", "0.8", "--exponential-decay-length-penalty", "0", "1.01"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    ports = {"ours": free_port(), "baseline": free_port()}
    commands = {
        "ours": [sys.executable, "-m", "eeyore.serve", "--port", str(ports["ours"]), "--served-model-name", "bench",
                 "--max-batch-size", str(max(args.levels)), "--max-model-len", str(max(1024, 2 * args.max_tokens)), "--dtype", args.dtype,
                 "--sequence-bias", "[[[2], -4.0]]", *flags, *threads,  # id 2 = <|im_end|>, SmolLM2's eos
                 *(["--compile"] if args.compile else [])],
        "baseline": [sys.executable, os.path.abspath(__file__), "--baseline-server", str(ports["baseline"]), *threads,
                     "--dtype", args.dtype],
    }
    names = ["ours"] if args.skip_baseline else ["ours", "baseline"]
    # Both servers stay up and the levels alternate between them, so each ratio compares two
    # neighbouring time windows: on a shared machine the background load drifts.
    procs = [start_server(commands[name], ports[name]) for name in names]
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in names}
    try:
        for name in names:  # warm-up, not measured: first calls (and, with --compile, compiling)
            asyncio.run(run_level(f"http://127.0.0.1:{ports[name]}", 2, 2, 8, False, tqdm(disable=True)))
        for c in args.levels:
            for name in names:
                results[name][c] = measure(name, f"http://127.0.0.1:{ports[name]}", c, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    if args.skip_baseline:
        return
    ours, base = results["ours"], results["baseline"]
    print("\nratios ours / baseline (TTFT and TPOT: baseline / ours, higher is better)")
    for c in args.levels:
        o, b = ours[c], base[c]
        print(f"c={c:<3} req/s x{o['req/s'] / b['req/s']:.1f}  out tok/s x{o['out tok/s'] / b['out tok/s']:.1f}  "
              f"TTFT p50 x{b['TTFT p50 s'] / o['TTFT p50 s']:.1f}  TTFT p99 x{b['TTFT p99 s'] / o['TTFT p99 s']:.1f}  "
              f"TPOT p50 x{b['TPOT p50 ms'] / o['TPOT p50 ms']:.1f}  mean reply {o['mean len']:.0f} vs {b['mean len']:.0f} tokens")


if __name__ == "__main__":
    main()
