"""The studio's HTTP side without a browser: CSRF, sign-in, storage, agreement, the engine backend."""
from __future__ import annotations

import http.cookiejar
import json
import shutil
import urllib.error
import urllib.request

import pytest

from eeyore.studio.agreement import cohen_kappa, pairwise
from eeyore.studio.annotate import AnnotationQueue
from eeyore.studio.store import append_jsonl, read_jsonl, record_path, write_json
from eeyore.train.data import DataError
from studio_fixtures import Served, start_studio


class Client:
    """A cookie-keeping HTTP client that sends the session's CSRF token like the pages do."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.csrf = None

    def call(self, path: str, body: dict | None = None, csrf: str | None = "session") -> tuple[int, object]:
        headers = {"Content-Type": "application/json"}
        if body is not None and csrf is not None:
            headers["X-CSRF-Token"] = self.csrf if csrf == "session" else csrf
        data = None if body is None else json.dumps(body).encode()
        try:
            with self.opener.open(urllib.request.Request(self.url + path, data, headers)) as resp:
                raw, status = resp.read().decode(), resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read().decode(), err.code
        lines = raw.splitlines()
        return status, json.loads(raw) if len(lines) == 1 else [json.loads(x) for x in lines]

    def start(self) -> "Client":
        self.csrf = self.call("/api/session")[1]["csrf"]
        return self


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_state_changes_need_the_sessions_csrf_token(served, tmp_path):
    url, _ = start_studio(served, tmp_path, replies=["fine"])
    stranger = Client(url)
    assert stranger.call("/api/signout", {}, csrf=None)[0] == 403  # no session at all
    c = Client(url).start()
    assert c.call("/api/signout", {}, csrf=None)[0] == 403
    assert c.call("/api/signout", {}, csrf="x" * 43)[0] == 403
    other = Client(url).start()
    assert c.call("/api/signout", {}, csrf=other.csrf)[0] == 403  # another browser's token
    assert c.call("/api/signout", {})[0] == 200
    status, body = c.call("/api/practice/sessions", {"record": {"profile": {}}})
    assert status == 422 and "profile." in body["error"]


def test_annotators_sign_in_with_their_token(served, tmp_path):
    url, _ = start_studio(served, tmp_path, "--annotators", "alice,bob", replies=["fine"])
    tokens = json.loads((tmp_path / "annotators.json").read_text())
    assert oct((tmp_path / "annotators.json").stat().st_mode & 0o777) == "0o600"
    c = Client(url).start()
    assert c.call("/api/annotate/next")[0] == 401
    assert c.call("/api/signin", {"name": "alice", "token": tokens["bob"]})[0] == 403
    assert c.call("/api/signin", {"name": "carol", "token": tokens["bob"]})[0] == 403
    assert c.call("/api/signin", {"name": "alice", "token": tokens["alice"]}) == (200, {"who": "alice"})
    assert c.call("/api/annotate/next")[1]["who"] == "alice"
    # a restart keeps the tokens
    again, _ = start_studio(served, tmp_path, "--annotators", "alice,bob", replies=["fine"])
    assert json.loads((tmp_path / "annotators.json").read_text()) == tokens


def test_requests_never_name_files(served, tmp_path):
    url, _ = start_studio(served, tmp_path, replies=["fine"])
    c = Client(url).start()
    write_json(tmp_path / "practice" / ("0" * 32 + ".json"), {"planted": True})  # not made by this studio
    for sid in ("..%2F..%2Fannotators", "0" * 32, "../profiles/versions"):
        assert c.call(f"/api/practice/sessions/{sid}")[0] == 404
    assert c.call("/api/profiles/..%2F0/decision", {"decision": "accepted"})[0] == 404
    with pytest.raises(KeyError):
        record_path(tmp_path, "../x")


def test_settings_are_checked_and_named(served, tmp_path):
    url, _ = start_studio(served, tmp_path, replies=["fine"])
    c = Client(url).start()
    record = c.call("/api/practice/profiles")[1]["profiles"][0]["record"]
    for settings, name in [({"top_p": 1.5}, "top_p"), ({"sequence_bias": [[[-1], 2.0]]}, "sequence_bias"),
                           ({"max_tokens": 0}, "max_tokens"), ({"seedz": 1}, "seedz")]:
        status, body = c.call("/api/practice/sessions", {"record": record, "settings": settings})
        assert status == 422 and name in body["error"], body


def test_cohen_kappa_by_hand():
    a, b = [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]
    # p_o = 4/5; p_e = 3/5 * 2/5 + 2/5 * 3/5 = 12/25; kappa = (20/25 - 12/25) / (13/25) = 8/13
    assert cohen_kappa(a, b) == pytest.approx(8 / 13)
    assert cohen_kappa([0, 1, "tie"], [0, 1, "tie"]) == pytest.approx(1.0)
    assert cohen_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)
    assert cohen_kappa([0, 0], [0, 0]) is None and cohen_kappa([], []) is None
    [row] = pairwise({"x": {"i": 0, "j": 1, "k": 0}, "y": {"i": 0, "j": 0}})
    assert (row["items"], row["agreement"], row["kappa"]) == (2, 0.5, 0.0)


def test_logs_survive_a_torn_last_line_and_documents_are_replaced_whole(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"a": 1})
    with open(log, "a") as f:
        f.write('{"a": 2, "tru')  # a crash in the middle of a write
    assert read_jsonl(log) == [{"a": 1}]
    write_json(tmp_path / "doc.json", {"v": 1})
    write_json(tmp_path / "doc.json", {"v": 2})
    assert json.loads((tmp_path / "doc.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "log.jsonl"]  # no temporary left


def test_pairs_file_errors_name_the_row(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "candidates": ["one"]}) + "\n")
    with pytest.raises(DataError, match="line 1.*candidates"):
        AnnotationQueue(str(bad), tmp_path / "out")


def test_live_candidates_for_a_practice_turn_join_the_queue(served, tmp_path):
    url, fake = start_studio(served, tmp_path, replies=["the first reply", "candidate one", "candidate two"])
    c = Client(url).start()
    record = c.call("/api/practice/profiles")[1]["profiles"][0]["record"]
    sid = c.call("/api/practice/sessions", {"record": record})[1]["id"]
    lines = c.call(f"/api/practice/sessions/{sid}/turns", {"content": "hello"})[1]
    assert lines[-1] == {"done": True, "turns": 1}
    assert c.call("/api/annotate/sample", {"session": sid, "turn": 2})[0] == 400
    status, body = c.call("/api/annotate/sample", {"session": sid, "turn": 1})
    assert status == 200 and body["total"] == 1
    item = c.call("/api/annotate/next")[1]["item"]
    assert {item["a"], item["b"]} == {"candidate one", "candidate two"}
    assert [m["content"] for m in item["prompt"]][1:] == ["hello"] and item["prompt"][0]["role"] == "system"
    assert len(fake.requests) == 3
    # the queue outlives a restart
    url2, _ = start_studio(served, tmp_path, replies=["x"])
    assert Client(url2).start().call("/api/annotate/next")[1]["item"]["id"] == item["id"]


@pytest.fixture
def long_tiny(tiny_ckpt, tmp_path):
    """The tiny checkpoint with room for a whole system prompt (its tokens are bytes)."""
    out = tmp_path / "tiny-long"
    shutil.copytree(tiny_ckpt, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return out


def test_engine_backend_streams_the_greedy_reply_and_biases_its_own_end_of_turn(served, tmp_path, long_tiny):
    import torch
    import transformers

    from eeyore.model.chat import ChatTemplate
    from serve_fixtures import IM_END, byte_tokenizer, hf_greedy

    url, _ = start_studio(served, tmp_path / "data", "--model", str(long_tiny))
    c = Client(url).start()
    data = c.call("/api/practice/profiles")[1]
    assert data["defaults"]["sequence_bias"] == [[[IM_END], -4.0]]  # the model's own end of turn
    assert (data["defaults"]["temperature"], data["defaults"]["top_p"]) == (1.0, 0.8)
    assert data["defaults"]["exponential_decay_length_penalty"] == [0, 1.01]
    greedy = {"temperature": 0.0, "sequence_bias": [], "exponential_decay_length_penalty": None, "max_tokens": 12}
    started = c.call("/api/practice/sessions", {"record": data["profiles"][0]["record"], "settings": greedy})[1]
    lines = c.call(f"/api/practice/sessions/{started['id']}/turns", {"content": "hi"})[1]
    assert lines[-1] == {"done": True, "turns": 1}, lines
    streamed = "".join(x.get("delta", "") for x in lines)
    tok = byte_tokenizer()
    chat = [{"role": "system", "content": started["system_prompt"]}, {"role": "user", "content": "hi"}]
    prompt = tok.encode(ChatTemplate.for_tokenizer(tok).render_prompt(chat))
    hf = transformers.AutoModelForCausalLM.from_pretrained(long_tiny, dtype=torch.float32).eval()
    expected = tok.decode(hf_greedy(hf, prompt, 12, eos_token_id=IM_END), skip_special_tokens=True)
    assert streamed == expected and expected
    saved = c.call(f"/api/practice/sessions/{started['id']}")[1]["messages"]
    assert (saved[-1]["role"], saved[-1]["content"]) == ("assistant", expected)


def test_browser_tests_skip_outside_ci_and_fail_under_ci(monkeypatch):
    import studio_fixtures

    monkeypatch.setattr(studio_fixtures.shutil, "which", lambda name: None)
    monkeypatch.delenv("EEYORE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium|playwright"):
        studio_fixtures.chromium_or_skip()
    monkeypatch.setenv("EEYORE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="EEYORE_REQUIRE_BROWSER=1 but"):
        studio_fixtures.chromium_or_skip()
