"""Profile extraction end to end against a scripted OpenAI-compatible endpoint: gold replies reach
full agreement, invalid JSON / wrong schema / HTTP errors are retried and then rejected with
reasons, an endpoint without JSON-schema support gets plain instructions, and a run interrupted
with SIGINT resumes without repeating or losing a conversation."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from eval_fakes import FakeEndpoint

from eeyore.data import agreement, extract_profiles
from eeyore.data.conversations import Conversation, read_records
from eeyore.profile import DEPRESSION, SYMPTOMS, profile_errors, sample_profiles_path
from eeyore.serve.client import ChatClient, Sampling

REPO = Path(__file__).resolve().parents[1]
SAMPLES = json.loads(sample_profiles_path().read_text())
GOLD = [f"c{i}" for i in (0, 1, 2, 3, 7)]
_ID = re.compile(r"this is session (c\d+)\.")


class ThreadedEndpoint:
    """A FakeEndpoint on its own event loop thread, for a CLI run in a subprocess."""

    def __init__(self, respond):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ep = FakeEndpoint(respond)
        asyncio.run_coroutine_threadsafe(self.ep.__aenter__(), self.loop).result(10)

    def __enter__(self) -> FakeEndpoint:
        return self.ep

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.ep.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def conversations(n: int = 8) -> list[dict]:
    """n conversations over the sample profiles' dialogues, each opened by a line naming it."""
    out = []
    for i in range(n):
        turns = [m for m in SAMPLES[i % len(SAMPLES)]["conversation"] if m["role"] != "system"]
        opening = {"role": "user", "content": f"Hello, this is session c{i}."}
        out.append({"id": f"c{i}", "messages": [{"role": "system", "content": "ignored"}, opening, *turns]})
    return out


def gold_reply(cid: str) -> str:
    sample = SAMPLES[int(cid[1:]) % len(SAMPLES)]
    quote = next(m["content"] for m in sample["conversation"] if m["role"] == "assistant")[:60]
    return json.dumps({"profile": sample["profile"], "evidence": {"situation of the client": quote}})


def session(body: dict) -> str:
    return _ID.search(body["messages"][1]["content"]).group(1)


def scripted(body: dict):
    """c0-c3 gold; c4 never JSON; c5 JSON in the wrong schema; c6 an HTTP error; c7 bad JSON, then gold."""
    cid = session(body)
    if cid == "c4":
        return "Sure! Here is the profile: {name: unknown"
    if cid == "c5":
        return json.dumps({"name": "Sam", "profile": {"age": 31}})
    if cid == "c6":
        return 500, "the model fell over"
    if cid == "c7" and len(body["messages"]) == 2:
        return "```json\n{\"profile\": \n```"
    return "```json\n" + gold_reply(cid) + "\n```"


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    convs = tmp_path / "conversations.jsonl"
    convs.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps([{"id": c, **json.loads(gold_reply(c))} for c in GOLD]))
    return convs, gold


def argv(convs: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [str(convs), "--output", str(out), "--base-url", url, "--attempts", "3", "--retries", "0",
            "--concurrency", "4", *extra]


def test_gold_agrees_fully_and_the_rest_is_retried_then_rejected(tmp_path):
    convs, gold = write_inputs(tmp_path)
    out = tmp_path / "profiles.jsonl"

    with ThreadedEndpoint(scripted) as ep:
        assert extract_profiles.main(argv(convs, out, ep.base_url)) == 0
    requests = ep.requests
    done = read_records(out)
    assert sorted(r["conversation_id"] for r in done) == GOLD
    assert all(profile_errors(r) == [] for r in done)
    assert {r["conversation_id"]: r["attempts"] for r in done}["c7"] == 2
    assert all(body["response_format"]["type"] == "json_schema" for body in requests)  # accepted: always sent
    assert "system" not in requests[0]["messages"][1]["content"] and "ignored" not in json.dumps(requests[0]["messages"])

    per_conv = {}
    for body in requests:
        per_conv.setdefault(session(body), []).append(body)
    assert {c: len(b) for c, b in per_conv.items()} == {"c0": 1, "c1": 1, "c2": 1, "c3": 1, "c4": 3, "c5": 3, "c6": 3, "c7": 2}
    retry = per_conv["c7"][1]["messages"]
    assert retry[2]["role"] == "assistant" and "not valid JSON" in retry[3]["content"]  # the error is quoted back

    rejects = {r["conversation_id"]: r for r in read_records(tmp_path / "profiles.rejects.jsonl")}
    assert sorted(rejects) == ["c4", "c5", "c6"]
    assert len(rejects["c4"]["reasons"]) == 3 and "not valid JSON" in rejects["c4"]["reason"]
    assert "unknown key 'name'" in rejects["c5"]["reason"] and "'profile.age' must be a string" in rejects["c5"]["reason"]
    assert "HTTP 500: the model fell over" in rejects["c6"]["reason"]

    md, png = tmp_path / "agreement.md", tmp_path / "agreement.png"
    assert agreement.main([str(out), str(gold), "--markdown", str(md), "--chart", str(png)]) == 0
    table = md.read_text()
    assert "Profiles compared: 5 (gold without a prediction: 0; predictions without gold: 0)" in table
    values = re.findall(r"\| ([0-9.]+|n/a) \| \d+ \|", table)
    assert values and all(v == "1.000" for v in values)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_endpoint_without_json_schema_gets_plain_instructions(tmp_path):
    convs, _ = write_inputs(tmp_path)

    def no_schema(body):
        if "response_format" in body:
            return 400, "only response_format {'type': 'text'} is supported"
        return gold_reply(session(body))

    with ThreadedEndpoint(no_schema) as ep:
        assert extract_profiles.main(argv(convs, tmp_path / "p.jsonl", ep.base_url, "--concurrency", "1")) == 0
    requests = ep.requests
    assert len(read_records(tmp_path / "p.jsonl")) == 8
    assert "response_format" in requests[0] and "response_format" not in requests[1]
    assert sum("response_format" in b for b in requests) == 1  # learnt once, then plain
    assert '"symptom severity": an object with each of these keys' in requests[1]["messages"][0]["content"]


def test_a_bad_request_is_not_taken_for_a_refused_schema():
    async def go():
        async with FakeEndpoint(lambda body: (400, "prompt too long")) as ep:
            async with ChatClient(ep.base_url, "m", retries=0) as client:
                ex = extract_profiles.Extractor(client, Sampling(), attempts=2)
                out = await ex.extract(Conversation("x", 0, "here", [{"role": "assistant", "content": "hi"}], "assistant", {}))
            return out, ex.schema_ok

    out, schema_ok = asyncio.run(go())
    assert out.record is None and len(out.reasons) == 2 and "prompt too long" in out.reasons[0]
    assert schema_ok is None


def test_interrupted_run_resumes_without_repeating_or_losing(tmp_path):
    convs, gold = write_inputs(tmp_path)
    out = tmp_path / "profiles.jsonl"
    answered, release = [], asyncio.Event()

    async def stalls_after_three(body):
        if len(answered) >= 3:
            await release.wait()  # the run is interrupted while waiting here
            return 503, "released"
        answered.append(session(body))
        return scripted(body)

    server = ThreadedEndpoint(stalls_after_three)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "eeyore.data.extract_profiles",
                                 *argv(convs, out, server.ep.base_url, "--concurrency", "1")],
                                cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 120
        while len(read_records(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        server.loop.call_soon_threadsafe(release.set)
        server.close()
    assert proc.returncode == 130, err
    assert "rerun to continue" in err and "Traceback" not in err
    first = [r["conversation_id"] for r in read_records(out)]
    assert first == ["c0", "c1", "c2"]

    with ThreadedEndpoint(scripted) as ep:
        assert extract_profiles.main(argv(convs, out, ep.base_url)) == 0
    again = {session(b) for b in ep.requests}
    assert again.isdisjoint(first)  # nothing done before is asked again
    done = [r["conversation_id"] for r in read_records(out)]
    rejected = [r["conversation_id"] for r in read_records(tmp_path / "profiles.rejects.jsonl")]
    assert sorted(done + rejected) == [f"c{i}" for i in range(8)]  # each exactly once
    assert sorted(done) == GOLD

    with ThreadedEndpoint(scripted) as ep:
        assert extract_profiles.main(argv(convs, out, ep.base_url)) == 0
        nothing = len(ep.requests)
        assert extract_profiles.main(argv(convs, out, ep.base_url, "--retry-rejected")) == 0
    retried = {session(b) for b in ep.requests}
    assert nothing == 0 and retried == {"c4", "c5", "c6"}
    assert sorted(r["conversation_id"] for r in read_records(tmp_path / "profiles.rejects.jsonl")) == ["c4", "c5", "c6"]


def test_a_line_cut_short_is_dropped_and_redone(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"conversation_id": "a"}\n{"conversation_id": "b", "prof')
    assert read_records(path) == [{"conversation_id": "a"}]
    assert path.read_text() == '{"conversation_id": "a"}\n'


def test_input_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "user"}]}) + "\n")
    assert extract_profiles.main([str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl line 1" in err and "message 0" in err and err.count("\n") == 1
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(c) + "\n" for c in [conversations(1)[0]] * 2))
    assert extract_profiles.main([str(dup), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "conversation id 'c0' is used by" in capsys.readouterr().err


def test_instructions_cover_every_field():
    text = extract_profiles.instructions()
    sample = SAMPLES[0]["profile"]
    for name, value in sample.items():
        assert f'"{name}"' in text
        if isinstance(value, dict):
            assert all(f'"{k}"' in text for k in value)
    assert DEPRESSION in text and SYMPTOMS in text


def test_our_server_on_the_embedded_model_returns_a_schema_valid_profile(smollm2_dir):
    """Through the project's own server the JSON schema is followed by constrained decoding, so
    even the weak embedded model answers a profile that passes the schema checks at once."""
    from serve_fixtures import LiveServer

    from eeyore.serve.engine import Engine

    srv = LiveServer(lambda: Engine.from_pretrained(smollm2_dir, max_batch_size=2, max_model_len=8192), name="smol")
    turns = [m for m in SAMPLES[0]["conversation"] if m["role"] != "system"][:6]

    async def go():
        async with ChatClient(srv.url + "/v1", "smol", retries=0) as client:
            ex = extract_profiles.Extractor(client, Sampling(temperature=0.0, max_tokens=4096), attempts=1)
            return await ex.extract(Conversation("s0", 0, "here", turns, "assistant", {})), ex.schema_ok

    try:
        out, schema_ok = asyncio.run(go())
    finally:
        srv.close()
    assert schema_ok is True
    assert out.record is not None, out.reasons
    assert profile_errors(out.record) == [] and json.loads(out.last_reply)["profile"] == out.record["profile"]
