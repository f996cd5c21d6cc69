"""`python -m eeyore.chat`, driven for real: a subprocess fed the counsellor's lines on stdin,
against the model in process (tiny checkpoint and the embedded model), the project's server,
and a scripted streaming endpoint that records what it was sent."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from eeyore.chat.__main__ import build_parser
from eeyore.chat.backends import ChatSampling
from eeyore.profile import DEMOGRAPHIC_FIELDS, DISTORTIONS, SYMPTOMS, load_profiles, render_system_prompt

ROOT = Path(__file__).resolve().parents[1]


def chat(args: list[str], stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "eeyore.chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def conversation(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data, data["messages"]


class ScriptedSSE:
    """A streaming /v1/chat/completions on a thread: `script(body)` gives the events to send, each
    a text piece, ("sleep", s), ("error", message) or ("http", status, message)."""

    def __init__(self, script) -> None:
        self.script, self.requests = script, []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, shutdown_timeout=1)  # a scripted 60 s sleep must not hold the teardown
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        ready.set()
        self.loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        events = self.script(body)
        if events and events[0][0] == "http":
            return web.json_response({"error": {"message": events[0][2]}}, status=events[0][1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            if isinstance(ev, tuple) and ev[0] == "sleep":
                await asyncio.sleep(ev[1])
                continue
            data = ({"error": {"message": ev[1]}} if isinstance(ev, tuple) else
                    {"choices": [{"index": 0, "delta": {"content": ev}, "finish_reason": None}]})
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
        return resp

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(ScriptedSSE(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_help_gives_every_flag_a_default():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), f"{action.option_strings} has no default in its help"


def test_reference_sampling_defaults():
    a = build_parser().parse_args([])
    s = ChatSampling(a.temperature, a.top_p, a.eot_bias, tuple(a.exponential_decay_length_penalty))
    assert (s.temperature, s.top_p, s.decay) == (1.0, 0.8, (0, 1.01))
    assert s.sequence_bias((128009,)) == (((128009,), -4.0),)  # the reference's [[[128009], -4.0]]
    assert ChatSampling(eot_bias=0).sequence_bias((2,)) == ()


def test_streams_from_an_endpoint_and_saves_on_ctrl_d(scripted, tmp_path):
    server = scripted(lambda body: ["I ", "don't ", "know ", f"({len(body['messages'])})."])
    out = tmp_path / "t.json"
    r = chat(["--profile", "2", "--base-url", server.url, "--eot-ids", "128009", "--seed", "5", "--out", str(out)],
             "Hello there.\n\n/help\nWhat happened this week?\n")
    assert r.returncode == 0, r.stderr
    assert "I don't know (2)." in r.stdout and "I don't know (4)." in r.stdout
    assert f"transcript saved to {out}" in r.stdout
    data, messages = conversation(out)
    profile = load_profiles(None)[2]
    assert messages[0] == {"role": "system", "content": render_system_prompt(profile, "train")}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "I don't know (2)." and messages[3]["content"] == "What happened this week?"
    assert "Ctrl-D" in data["ended_by"]
    first, second = server.requests
    assert first["model"] == "scripted" and first["stream"] is True
    assert (first["temperature"], first["top_p"]) == (1.0, 0.8)
    assert first["sequence_bias"] == [[[128009], -4.0]]
    assert first["exponential_decay_length_penalty"] == [0, 1.01]
    assert (first["seed"], second["seed"]) == (5, 6)
    assert second["messages"] == messages[:4]  # the whole history, the client's reply included
    assert data["sampling"]["sequence_bias"] == [[[128009], -4.0]]


def test_plain_openai_sends_only_openai_fields(scripted, tmp_path):
    server = scripted(lambda body: ["ok"])
    r = chat(["--base-url", server.url, "--plain-openai", "--eot-ids", "7", "--out", str(tmp_path / "t.json")], "hi\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert not {"sequence_bias", "exponential_decay_length_penalty"} & set(server.requests[0])


def test_endpoint_errors_end_with_one_line_and_the_transcript(scripted, tmp_path):
    server = scripted(lambda body: ["Well, ", ("error", "the model failed: out of memory")])
    out = tmp_path / "t.json"
    r = chat(["--base-url", server.url, "--out", str(out)], "hi\nmore\n")
    assert r.returncode == 1
    assert "reported an error mid-reply: the model failed: out of memory" in r.stderr
    assert "Traceback" not in r.stderr
    data, messages = conversation(out)
    assert data["ended_by"].startswith("error:") and messages[-1] == {"role": "user", "content": "hi"}

    refused = scripted(lambda body: [("http", 400, "the context length is 512 tokens")])
    r = chat(["--base-url", refused.url, "--out", str(out)], "hi\n")
    assert r.returncode == 1 and "refused the request: HTTP 400: the context length is 512 tokens" in r.stderr


@pytest.mark.parametrize("when", ["at the prompt", "mid-reply"])
def test_ctrl_c_saves_the_transcript(scripted, tmp_path, when):
    server = scripted(lambda body: ["Part one.", ("sleep", 60), "never sent"])
    out = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "eeyore.chat", "--base-url", server.url, "--out", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if when == "mid-reply":
        proc.stdin.write("hello\n")
        proc.stdin.flush()
    seen, deadline = "", time.monotonic() + 120
    want = "Part one." if when == "mid-reply" else "counsellor> "
    while want not in seen and time.monotonic() < deadline:
        seen += proc.stdout.read(1)
    assert want in seen
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and f"transcript saved to {out}" in stdout
    data, messages = conversation(out)
    assert "Ctrl-C" in data["ended_by"]
    if when == "mid-reply":
        assert messages[1:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Part one."}]
    else:
        assert len(messages) == 1


def test_bad_profiles_fail_in_one_line(tmp_path):
    r = chat(["--profile", "99"], "")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "sample profiles" in r.stderr
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"profile": {"name": "x"}}))
    r = chat(["--profile", str(bad)], "")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing field 'profile.gender'" in r.stderr


def test_in_process_and_server_give_the_same_conversation(tiny_ckpt, tmp_path):
    """The tiny checkpoint here and behind the project's server: with a seed, the same replies,
    and both equal to the engine's own generation with the reference's sampling."""
    import shutil

    from serve_fixtures import LiveServer

    # One token per byte, and a random model's bytes come back as 3-byte replacement characters:
    # the same weights with room for a few turns (RoPE has no length limit of its own).
    tiny_ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "tiny"))
    config = json.loads((tiny_ckpt / "config.json").read_text())
    (tiny_ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))

    from eeyore.chat.backends import EngineBackend
    from eeyore.serve.engine import Engine

    profile = tmp_path / "short.json"  # the byte tokenizer spends a token per byte: keep the prompt short
    fields = dict(load_profiles(None)[0].fields)
    fields |= {k: "Cannot be identified" for k in DEMOGRAPHIC_FIELDS + ("situation of the client", "counseling history")}
    for table, shown in ((SYMPTOMS, "Mild"), (DISTORTIONS, "Exhibited")):
        fields[table] = {k: shown if i == 0 else "Not exhibited" for i, k in enumerate(fields[table])}
    profile.write_text(json.dumps({"profile": fields}))
    lines = "Hello.\nTell me more.\n"
    local = chat(["--profile", str(profile), "--model", str(tiny_ckpt), "--seed", "3", "--max-tokens", "24", "--out", str(tmp_path / "a.json")], lines)
    assert local.returncode == 0, local.stderr
    data, messages = conversation(tmp_path / "a.json")
    assert data["sampling"]["sequence_bias"] == [[[257], -4.0]]  # the byte tokenizer's <|im_end|>

    backend = EngineBackend(str(tiny_ckpt))
    try:
        s = ChatSampling(max_tokens=24, seed=3)
        for turn, i in enumerate((2, 4)):
            want = backend.engine.generate([messages[:i]], backend.params(s, turn), progress=False)[0].text
            assert messages[i]["content"] == want and want in local.stdout
    finally:
        backend.engine.close()

    server = LiveServer(lambda: Engine.from_pretrained(str(tiny_ckpt), "float32", "cpu", max_batch_size=2))
    try:
        remote = chat(["--profile", str(profile), "--base-url", server.url + "/v1", "--eot-ids", "257", "--seed", "3", "--max-tokens", "24",
                       "--out", str(tmp_path / "b.json")], lines)
    finally:
        server.close()
    assert remote.returncode == 0, remote.stderr
    assert conversation(tmp_path / "b.json")[1] == messages


def test_embedded_model(smollm2_dir, tmp_path):
    out = tmp_path / "t.json"
    r = chat(["--profile", "0", "--seed", "0", "--max-tokens", "12", "--out", str(out)],
             "Hi, I'm glad you came. What brings you here?\n/quit\n")
    assert r.returncode == 0, r.stderr
    data, messages = conversation(out)
    assert data["sampling"]["sequence_bias"] == [[[2], -4.0]]  # SmolLM2's <|im_end|>
    assert data["ended_by"] == "/quit" and messages[2]["role"] == "assistant"
    assert messages[2]["content"].strip() and messages[2]["content"] in r.stdout
