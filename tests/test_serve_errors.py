"""Every client mistake gets its 4xx status and the OpenAI error envelope, never a 500."""
import json
import threading
import urllib.error
import urllib.request

import pytest

from eeyore.serve.engine import Engine
from eeyore.serve.params import SamplingParams
from serve_fixtures import LiveServer, tiny_checkpoint

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(ckpt):
    srv = LiveServer(lambda: Engine.from_pretrained(ckpt, max_batch_size=1, max_queue=1, max_model_len=64),
                     api_key=KEY, max_body_bytes=64 * 1024)
    yield srv
    srv.close()


def call(server, path, body=None, method=None, headers=AUTH):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def assert_error(result, status, param=None, code=None, says=None):
    got, body, _ = result
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    if says:
        assert says in err["message"]


def with_(**changes):
    return {**CHAT, **changes}


BAD_CHAT = [
    (with_(messages="hi"), "messages"),
    (with_(messages=[]), "messages"),
    (with_(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (with_(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (with_(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content"),
    (with_(temperature="hot"), "temperature"),
    (with_(temperature=2.5), "temperature"),
    (with_(top_p=0), "top_p"),
    (with_(top_k=-2), "top_k"),
    (with_(n=0), "n"),
    (with_(n=True), "n"),
    (with_(max_tokens=0), "max_tokens"),
    (with_(max_tokens="5"), "max_tokens"),
    (with_(max_completion_tokens=1.5), "max_completion_tokens"),
    (with_(stop=5), "stop"),
    (with_(stop=[""]), "stop"),
    (with_(seed="x"), "seed"),
    (with_(presence_penalty=3), "presence_penalty"),
    (with_(top_logprobs=2), "top_logprobs"),
    (with_(logprobs=True, top_logprobs=21), "top_logprobs"),
    (with_(stream="yes"), "stream"),
    (with_(stream_options={"include_usage": True}), "stream_options"),
    (with_(logit_bias={"a": 1}), "logit_bias"),
    (with_(sequence_bias=[[[1], "x"]]), "sequence_bias"),
    (with_(exponential_decay_length_penalty=[1]), "exponential_decay_length_penalty"),
    (with_(sequence_bias=[[[100000], 1.0]]), "sequence_bias"),
    (with_(logit_bias={"300": 5}), "sequence_bias"),
    (with_(tools=[{"type": "function"}]), "tools"),
    (with_(response_format={"type": "json_schema", "json_schema": {"schema": {"anyOf": []}}}), "response_format"),
    (with_(response_format={"type": "grammar"}), "response_format"),
    (with_(response_format="json"), "response_format"),
    (with_(model=3), "model"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p + str(i) for i, (_, p) in enumerate(BAD_CHAT)])
def test_bad_chat_fields_are_400(server, body, param):
    assert_error(call(server, "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_malformed_bodies_are_400(server, body):
    assert_error(call(server, "/v1/chat/completions", body), 400)


def test_bad_completion_prompts_are_400(server):
    assert_error(call(server, "/v1/completions", {"model": "tiny"}), 400, "prompt")
    assert_error(call(server, "/v1/completions", {"prompt": [1, -3]}), 400, "prompt")
    assert_error(call(server, "/v1/completions", {"prompt": [1, 9999]}), 400, "prompt", says="outside the vocabulary")
    assert_error(call(server, "/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    assert_error(call(server, "/v1/completions", {"prompt": "x", "logprobs": 6}), 400, "logprobs")


def test_context_length_is_400_only_when_the_prompt_does_not_fit(server):
    long = with_(messages=[{"role": "user", "content": "x" * 100}])
    assert_error(call(server, "/v1/chat/completions", long), 400, "messages", "context_length_exceeded",
                 says="context length is 64")
    # a budget beyond the context is cut to the room left: the reply ends with "length"
    status, body, _ = call(server, "/v1/completions", {"prompt": [1] * 30, "max_tokens": 40, "ignore_eos": True})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 64 - 30


def test_auth(server):
    assert_error(call(server, "/v1/chat/completions", CHAT, headers={}), 401, code="invalid_api_key")
    assert_error(call(server, "/v1/models", headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
    assert_error(call(server, "/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401, code="invalid_api_key")
    assert_error(call(server, "/v1/models", headers={"Authorization": f"Bearer {KEY}x"}), 401, code="invalid_api_key")
    assert call(server, "/health", headers={})[0] == 200
    assert call(server, "/v1/chat/completions", CHAT)[0] == 200
    for scheme in ("bearer", "BEARER", "BeArEr"):  # the scheme is case-insensitive (RFC 9110)
        assert call(server, "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})[0] == 200


def test_not_found_method_and_size(server):
    assert_error(call(server, "/v1/nothing"), 404)
    assert_error(call(server, "/v1/chat/completions", method="GET"), 405)
    assert_error(call(server, "/v1/completions", {"prompt": "x" * 100_000}), 413)


def test_full_queue_is_429_with_retry_after(server):
    engine = server.engine
    started = threading.Event()
    running = engine.submit([1, 2], SamplingParams(max_tokens=60, ignore_eos=True), lambda out: started.set())
    assert started.wait(30)
    waiting = engine.submit([1, 2], SamplingParams(max_tokens=1), lambda out: None)  # the one slot is taken
    try:
        result = call(server, "/v1/chat/completions", CHAT)
        assert_error(result, 429)
        assert result[2]["Retry-After"] == "1"
    finally:
        engine.abort(running)
        engine.abort(waiting)


def test_503_while_loading(ckpt):
    release = threading.Event()

    def slow_load():
        release.wait()
        return Engine.from_pretrained(ckpt, max_batch_size=1, max_model_len=64)

    srv = LiveServer(slow_load, wait=False)
    try:
        status, body, headers = call(srv, "/health", headers={})
        assert (status, body["status"], headers["Retry-After"]) == (503, "loading", "5")
        assert_error(call(srv, "/v1/chat/completions", CHAT, headers={}), 503)
        release.set()
        srv.wait_loaded()
        assert call(srv, "/health", headers={})[:2] == (200, {"status": "ok"})
    finally:
        release.set()
        srv.close()
