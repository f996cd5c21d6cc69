"""`python -m eeyore.serve` as a real process: flags checked at start-up, the KV cache sized from
memory, timestamps and `ready` in the log, slow clients timed out, and SIGTERM draining."""
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from eeyore.model import LlamaConfig
from eeyore.serve import memory
from eeyore.serve.__main__ import parse_args, sampling_overrides
from eeyore.serve.engine import Engine
from eeyore.serve.lifecycle import drain
from serve_fixtures import LiveServer
from test_serve_cli import REFERENCE_ARGV, free_port

GIB = 2**30


@pytest.mark.parametrize("flags,named", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1e-300"], "--temperature"),
    (["--top-p", "inf"], "--top-p"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--exponential-decay-length-penalty", "0", "1e308"], "--exponential-decay-length-penalty"),
    (["--sequence-bias", "[[[2], NaN]]"], "--sequence-bias"),
])
def test_bad_sampling_flags_are_named_before_anything_loads(flags, named):
    with pytest.raises(ValueError, match=named):
        sampling_overrides(parse_args(flags))


def test_the_reference_flags_pass():
    sampling_overrides(parse_args(REFERENCE_ARGV))


def test_cache_plan_follows_the_memory_budget(monkeypatch):
    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=1, hidden_size=64, num_attention_heads=1,
                         max_position_embeddings=32768)  # 2 * 2 * 1 * 64 * 4 bytes = 1 KiB per position
    per_position = memory.kv_bytes_per_token(config, torch.float32)
    assert per_position == 1024
    cpu = torch.device("cpu")

    def plan(free_bytes, slots=16, max_len=None):
        monkeypatch.setattr(memory, "available_bytes", lambda device: free_bytes)
        return memory.plan_cache(config, torch.float32, cpu, slots, max_len, 0.5)

    assert plan(2 * 16 * 32768 * 1024) == (16, 32768)  # everything fits: the model's own context
    assert plan(2 * 16 * 8192 * 1024) == (16, 8192)  # the context shrinks first...
    assert plan(2 * 16 * 1024 * 1024) == (4, 4096)  # ...but not below 4096: fewer slots instead
    assert plan(2 * 1000 * 1024) == (1, 1000)  # not even one slot of 4096
    assert plan(2 * 16 * 1024 * 1024, slots=16, max_len=2048) == (8, 2048)  # explicit length kept
    assert plan(2 * GIB, slots=2, max_len=100_000) == (2, 32768)  # bounded by the model's positions
    with pytest.raises(MemoryError):
        plan(1024)


def start(args, log_path):
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "eeyore.serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, port, log


def wait_for_line(path, text, proc, seconds=300):
    for _ in range(seconds * 10):
        if text in path.read_text():
            return
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"never logged {text!r}: {path.read_text()}")


def open_stream(url, body):
    """A streamed chat request, once its first event has arrived (it is running)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    resp.first = resp.readline() + resp.readline()
    assert resp.first.startswith(b"data: ")
    return resp


def events_of(resp):
    text = (resp.first + resp.read()).decode()
    return [e for e in text.split("\n\n") if e.strip()]


def test_sequence_bias_outside_the_vocabulary_fails_at_start_up(tiny_ckpt, tmp_path):
    """The reference's Llama-3 eos bias on a model with a 259-token vocabulary: one line that
    names the flag and the model's own end-of-turn ids."""
    proc = subprocess.run([sys.executable, "-m", "eeyore.serve", "--model", str(tiny_ckpt), "--port", str(free_port()),
                           "--sequence-bias", "[[[128009], -4.0]]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --sequence-bias") and "end-of-turn ids are [257]" in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_drain_lets_running_requests_finish_and_ends_the_rest(tiny_ckpt):
    """In process, with every decode step slowed to >= 0.1 s: a one-token request finishes
    within the 10 s grace period, a 480-token one (>= 48 s) cannot and ends with an error event
    and [DONE]; meanwhile new requests get 503."""
    srv = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=512))
    step = srv.engine._decode_forward
    srv.engine._decode_forward = lambda running: (time.sleep(0.1), step(running))[1]
    try:
        long = open_stream(srv.url, {"messages": [{"role": "user", "content": "Tell me a story."}],
                                     "max_tokens": 480, "ignore_eos": True})
        short = open_stream(srv.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        listener = SimpleNamespace(closed=False)
        listener.close = lambda: setattr(listener, "closed", True)
        drained = asyncio.run_coroutine_threadsafe(drain(srv.app, listener, 10.0), srv.loop)
        short_events = events_of(short)
        assert short_events[-1] == "data: [DONE]"
        assert json.loads(short_events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert listener.closed
        with pytest.raises(urllib.error.HTTPError) as refused:
            open_stream(srv.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert refused.value.code == 503
        drained.result(120)
        long_events = events_of(long)
        assert long_events[-1] == "data: [DONE]"
        assert "error" in json.loads(long_events[-2][len("data: "):])
    finally:
        srv.close()


def test_ready_header_timeout_and_sigterm(smollm2_dir, tmp_path):
    """The real process: `ready` logged with a timestamp once it answers, a silent connection
    closed, and on SIGTERM a running stream ended after the grace period with an error event and
    [DONE], new connections refused, exit status 0."""
    log_path = tmp_path / "server.log"
    proc, port, log = start(["--max-model-len", "8192", "--max-batch-size", "2", "--header-timeout", "1",
                             "--shutdown-timeout", "1"], log_path)
    try:
        wait_for_line(log_path, "ready: ", proc)
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:  # ready means it answers
            assert resp.status == 200
        lines = log_path.read_text().splitlines()
        ready = next(line for line in lines if "ready: " in line)
        assert ready[:4].isdigit() and ready[4] == "-"  # a timestamp leads every line

        silent = socket.create_connection(("127.0.0.1", port))  # sends nothing: closed after 1 s
        silent.settimeout(30)
        assert silent.recv(1) == b""
        silent.close()

        long = open_stream(url, {"messages": [{"role": "user", "content": "Tell me a story."}],
                                 "max_tokens": 8000, "ignore_eos": True})
        proc.send_signal(signal.SIGTERM)
        long_events = events_of(long)
        assert long_events[-1] == "data: [DONE]"
        assert "error" in json.loads(long_events[-2][len("data: "):])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "stopping" in log_path.read_text()


def test_port_zero_logs_the_bound_port_and_the_dtype(tiny_ckpt, tmp_path):
    """--port 0 lets the system pick: the log names the port it picked (not 0), the load line
    names the dtype, and a --cpu-matmul that cannot apply to it (fp16) says so."""
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "eeyore.serve", "--model", str(tiny_ckpt), "--port", "0",
                             "--dtype", "float16", "--cpu-matmul", "packed", "--max-model-len", "64"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log_path, "ready: ", proc)
        ready = next(line for line in log_path.read_text().splitlines() if "ready: " in line)
        port = int(ready.rsplit(":", 1)[1].split("/")[0])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        text = log_path.read_text()
        assert " on cpu in float16:" in text, text
        assert "--cpu-matmul packed has no effect on a float16 model" in text, text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def test_compile_with_packed_weights_is_refused_before_loading():
    proc = subprocess.run([sys.executable, "-m", "eeyore.serve", "--compile", "--cpu-matmul", "packed",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "listening" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--cpu-matmul packed cannot be combined with --compile: the compiler takes plain weights")


def test_sigterm_while_compiling_at_start_exits_at_once(tiny_ckpt, tmp_path):
    """--compile compiles while the server loads (minutes for a real model): a SIGTERM then ends
    the process without waiting for the load, so the later batch buckets are never compiled."""
    log_path = tmp_path / "server.log"
    proc, port, log = start(["--model", str(tiny_ckpt), "--compile", "--max-batch-size", "4", "--max-model-len", "64"],
                            log_path)
    try:
        wait_for_line(log_path, "compiling the decode step for 2 rows (1 of 2)", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = log_path.read_text()
    assert "stopped" in text and "(2 of 2)" not in text and "ready: " not in text, text
