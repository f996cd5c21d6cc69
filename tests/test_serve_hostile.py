"""Hostile requests get their 400 and never touch a bystander: a greedy stream that runs while
they arrive must finish intact, token for token what transformers' `generate` gives."""
import json
import threading
import urllib.error
import urllib.request

import pytest

from eeyore.serve.engine import Engine
from eeyore.serve.params import SamplingParams
from eeyore.serve.request import EngineFull
from serve_fixtures import LiveServer, hf_greedy

MESSAGES = [{"role": "user", "content": "hi"}]
BYSTANDER_TOKENS = 200


def raw(body: str) -> bytes:
    return body.encode()


def chat(**fields) -> bytes:
    return json.dumps({"messages": MESSAGES, "max_tokens": 4, **fields}).encode()


def with_literal(field: str, literal: str) -> bytes:
    """A chat body with a field whose JSON text is given as is (NaN, Infinity, huge integers)."""
    return raw('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "%s": %s}' % (field, literal))


HOSTILE = [  # (body, the param the error names; None: the body as a whole)
    (with_literal("temperature", "NaN"), "temperature"),
    (with_literal("temperature", "1e-300"), "temperature"),
    (with_literal("top_p", "NaN"), "top_p"),
    (with_literal("top_p", "Infinity"), "top_p"),
    (with_literal("min_p", "NaN"), "min_p"),
    (with_literal("min_p", "-Infinity"), "min_p"),
    (with_literal("repetition_penalty", "NaN"), "repetition_penalty"),
    (with_literal("repetition_penalty", "Infinity"), "repetition_penalty"),
    (with_literal("presence_penalty", "NaN"), "presence_penalty"),
    (with_literal("frequency_penalty", "-Infinity"), "frequency_penalty"),
    (with_literal("sequence_bias", "[[[5], NaN]]"), "sequence_bias"),
    (with_literal("sequence_bias", "[[[5], Infinity]]"), "sequence_bias"),
    (with_literal("sequence_bias", "[[[5], 1%s]]" % ("0" * 400)), "sequence_bias"),
    (with_literal("exponential_decay_length_penalty", "[0, 1e308]"), "exponential_decay_length_penalty"),
    (with_literal("exponential_decay_length_penalty", "[0, NaN]"), "exponential_decay_length_penalty"),
    (with_literal("exponential_decay_length_penalty", "[0, 1%s]" % ("0" * 400)), "exponential_decay_length_penalty"),
    (with_literal("max_tokens", "9" * 5000), None),  # Python refuses to read integers of > 4300 digits
    (with_literal("seed", "9" * 5000), None),
    (with_literal("max_tokens", "9" * 4000), "max_tokens"),
    (with_literal("seed", "9" * 4000), "seed"),
    (raw("[" * 5000 + "]" * 5000), None),
    (raw('{"messages": ' + "[" * 5000 + "]" * 5000 + "}"), None),
    (raw('{"messages": [{"role": "user", "content": "a\\ud800b"}]}'), "messages[0].content"),
    (raw('{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}'), "stop"),
    (raw('{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}'), "model"),
    (chat(logit_bias={"²": 1}), "logit_bias"),
    (chat(logit_bias={"١": 1}), "logit_bias"),
    (chat(logit_bias={"１": 1}), "logit_bias"),
    (chat(logit_bias={"5": float("nan")}), "logit_bias"),
    (chat(messages=MESSAGES * 9), "messages"),  # this server takes at most 8
]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=4, max_model_len=512),
                     max_messages=8)
    yield srv
    srv.close()


def post(server, path: str, body: bytes):
    req = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_hostile_requests_are_400_and_the_bystander_stream_finishes_intact(server, tiny_hf):
    client = server.client()
    prompt = server.engine.encode_chat(MESSAGES)
    expected = hf_greedy(tiny_hf, prompt, BYSTANDER_TOKENS, min_new_tokens=BYSTANDER_TOKENS)
    first, pieces, finish = threading.Event(), [], []

    def bystander():
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, stream=True,
                                                max_tokens=BYSTANDER_TOKENS, extra_body={"ignore_eos": True})
        for chunk in stream:
            first.set()
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish.append(chunk.choices[0].finish_reason)

    thread = threading.Thread(target=bystander)
    thread.start()
    assert first.wait(60)
    answers = [post(server, "/v1/chat/completions", body) for body, _ in HOSTILE]
    thread.join(120)
    for (body, param), (status, reply) in zip(HOSTILE, answers):
        assert status == 400, (body[:80], reply)
        assert reply["error"]["param"] == param, (body[:80], reply)
    assert finish[-1] == "length"
    assert "".join(pieces) == server.engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_row_that_breaks_the_sampler_fails_alone(tiny_ckpt, tiny_hf):
    """Offline callers skip the HTTP checks: parameters that break the batched sampling step
    (a NaN temperature, a negative decay factor) end only their own request."""
    prompt = [5, 6, 7, 8, 9]
    expected = hf_greedy(tiny_hf, prompt, 120, min_new_tokens=120)
    poison = [SamplingParams(temperature=float("nan"), max_tokens=5),
              SamplingParams(exponential_decay_length_penalty=(0, -1.0), max_tokens=5),
              SamplingParams(temperature=1e-300, max_tokens=5),
              SamplingParams(repetition_penalty=float("nan"), max_tokens=5)]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=6, max_model_len=256) as engine:
        outs, first = [], threading.Event()

        def sink(out):
            outs.append(out)
            first.set()

        engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True), sink)
        assert first.wait(30)
        failed = []
        for params in poison:
            done = threading.Event()
            engine.submit([1, 2, 3], params, lambda out, done=done: (failed.append(out), done.set())
                          if out.finish_reason else None)
            assert done.wait(30)
        while not outs or outs[-1].finish_reason is None:
            threading.Event().wait(0.05)
    assert [o.finish_reason for o in failed] == ["error"] * len(poison)
    assert [t for o in outs for t in o.token_ids] == expected
    assert outs[-1].finish_reason == "length"


def test_a_burst_of_slots_plus_queue_is_admitted_whole(tiny_ckpt):
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_queue=3, max_model_len=512) as engine:
        burst = [engine.submit([1, 2, 3], long, lambda out: None) for _ in range(2 + 3)]
        with pytest.raises(EngineFull):
            engine.submit([1, 2, 3], long, lambda out: None)
        for r in burst:
            engine.abort(r)


def test_any_model_name_is_served_under_the_served_name(server):
    client = server.client()
    r = client.chat.completions.create(model="eeyore", messages=MESSAGES, max_tokens=2)
    assert r.model == "tiny"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_strict_model_name_is_404(tiny_ckpt):
    srv = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=1, max_model_len=64),
                     strict_model_name=True)
    try:
        status, body = post(srv, "/v1/chat/completions", chat(model="default"))
        assert (status, body["error"]["code"], body["error"]["param"]) == (404, "model_not_found", "model")
        assert post(srv, "/v1/chat/completions", chat(model="tiny"))[0] == 200
    finally:
        srv.close()
