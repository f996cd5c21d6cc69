"""Constrained decoding for `response_format`: every reply parses and follows its schema, with
random token choices, the tiny random model and the embedded model alike; refused schemas are
one-line 400s; a guided row never changes an unconstrained row's tokens."""
import json
import threading

import openai
import pytest
import torch

from eeyore.model.tokenizer import Tokenizer
from eeyore.profile import json_schema as profile_schema
from eeyore.serve.engine import Engine
from eeyore.serve.guided import Guide, GuidedError, JsonVocab, compile_format
from eeyore.serve.params import SamplingParams
from serve_fixtures import LiveServer, byte_tokenizer, hf_greedy

SCORE = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
         "required": ["score"], "additionalProperties": False}
MIXED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"type": "string", "enum": ["low", "very low", "fine"]},
        "age": {"type": "integer", "minimum": -5, "maximum": 1000},
        "weight": {"type": "number", "exclusiveMinimum": 0},
        "count": {"type": "integer"},
        "sleeps": {"type": "boolean"},
        "nothing": {"type": "null"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "maybe": {"type": "array", "items": {"type": "integer", "enum": [1, 10, 100]}},
        "nested": {"type": "object", "properties": {"a": {"const": "x"}, "b": {"type": "string", "maxLength": 3}},
                   "required": ["b"]},
    },
    "required": ["name", "mood", "age", "sleeps", "tags"],
}


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


def check(value, schema: dict, where: str = "$") -> None:
    """A hand-written validator for the subset guided.py supports (the reference the reply is held to)."""
    if "const" in schema:
        assert value == schema["const"], where
        return
    if "enum" in schema:
        assert value in schema["enum"] and type(value) in {type(v) for v in schema["enum"]}, where
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), where
        assert set(schema.get("required", [])) <= set(value), where
        for key, sub in value.items():
            check(sub, schema["properties"][key], f"{where}.{key}")
    elif kind == "array":
        assert isinstance(value, list), where
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), where
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9), where
    elif kind in ("integer", "number"):
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert value >= schema.get("minimum", -10**18) and value > schema.get("exclusiveMinimum", -10**18), where
        assert value <= schema.get("maximum", 10**18), where
    elif kind == "boolean":
        assert isinstance(value, bool), where
    elif kind == "null":
        assert value is None, where


def random_reply(guide: Guide, tokenizer: Tokenizer, seed: int, eos: int, limit: int = 20000) -> str:
    """Uniformly random allowed tokens until only the end of text is allowed."""
    rng, ids = torch.Generator().manual_seed(seed), []
    for _ in range(limit):
        if guide.done:
            assert guide.mask().nonzero()[:, 0].tolist() == [eos]
            return tokenizer.decode(ids)
        allowed = guide.mask().nonzero()[:, 0]
        token = int(allowed[torch.randint(len(allowed), (), generator=rng)])
        if token == eos:  # a number at the root may end the reply
            return tokenizer.decode(ids)
        ids.append(token)
        guide.advance(token)
    raise AssertionError("the reply never ended")


@pytest.mark.parametrize("schema", [SCORE, MIXED, profile_schema(), {"type": "object", "properties": {"any": {}}}, {"type": "array", "items": {"type": "integer"}},
                                    {"type": "integer", "minimum": 3}, {"type": "string", "maxLength": 40}])
def test_random_tokens_always_give_valid_json_for_the_schema(schema, smollm2_dir):
    """Whatever a model picks among the allowed tokens, the text parses and follows the schema:
    with a one-byte-per-token tokenizer and with the embedded model's BPE tokenizer."""
    for tokenizer, size, eos in ((byte_tokenizer(), 259, 257), (Tokenizer.from_pretrained(smollm2_dir), 49152, 2)):
        vocab = JsonVocab(tokenizer, size, [eos])
        node = compile_format(fmt(schema))
        for seed in range(6 if size == 259 else 3):
            check(json.loads(random_reply(Guide(node, vocab), tokenizer, seed, eos)), schema)


def test_json_object_random_tokens_give_an_object():
    tokenizer = byte_tokenizer()
    vocab = JsonVocab(tokenizer, 259, [257])
    for seed in range(20):
        assert isinstance(json.loads(random_reply(Guide(compile_format({"type": "json_object"}), vocab),
                                                  tokenizer, seed, 257)), dict)


def test_integers_stay_within_bounds_digit_by_digit():
    tokenizer = byte_tokenizer()
    vocab = JsonVocab(tokenizer, 259, [257])
    schema = {"type": "integer", "minimum": -120, "maximum": 3000}
    seen = {json.loads(random_reply(Guide(compile_format(fmt(schema)), vocab), tokenizer, s, 257)) for s in range(60)}
    assert all(-120 <= v <= 3000 for v in seen) and any(v < 0 for v in seen) and any(v > 99 for v in seen)


@pytest.mark.parametrize("response_format, keyword", [
    (fmt({"anyOf": [{"type": "string"}, {"type": "null"}]}), "'anyOf'"),
    (fmt({"type": ["string", "null"]}), "type lists"),
    (fmt({"type": "string", "pattern": "^a$"}), "'pattern'"),
    (fmt({"type": "object", "properties": {"a": {"$ref": "#/x"}}}), "schema.properties.a: keyword '$ref'"),
    (fmt({"type": "string", "format": "date"}), "'format'"),
    (fmt({"type": "integer", "minimum": 5, "maximum": 4}), "no integer"),
    (fmt({"type": "object", "required": ["a"]}), "'a'"),
    ({"type": "json_schema"}, "'json_schema' object"),
    ({"type": "grammar"}, "'grammar'"),
])
def test_unsupported_schemas_are_refused_in_one_line(response_format, keyword):
    with pytest.raises(GuidedError) as err:
        compile_format(response_format)
    assert keyword in str(err.value) and "\n" not in str(err.value)


def test_text_is_no_constraint():
    assert compile_format({"type": "text"}) is None


# ----------------------------------------------------------------------------- the engine and the server


def test_offline_engine_tiny_model_replies_follow_the_schema(tiny_ckpt):
    """A random model, greedy and sampled with every processor on: still always valid."""
    prompts = [[5, 6, 7, 8]] * 6
    params = [SamplingParams(temperature=0, guided=fmt(MIXED), max_tokens=400),
              SamplingParams(temperature=1.5, top_k=0, seed=1, guided=fmt(MIXED), max_tokens=400),
              SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1, repetition_penalty=1.3, presence_penalty=1.0,
                             seed=2, guided=fmt(SCORE), max_tokens=50),
              SamplingParams(temperature=1.0, seed=3, guided={"type": "json_object"}, max_tokens=2000,
                             exponential_decay_length_penalty=(2, 1.5)),
              SamplingParams(temperature=1.0, seed=4, guided=fmt({"type": "array", "items": SCORE}), max_tokens=400),
              SamplingParams(temperature=1.0, seed=5, guided=fmt({"type": "integer"}), max_tokens=50)]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=6, max_model_len=512) as engine:
        for prompt_params, out in zip(params, engine.generate(prompts, params, progress=False)):
            assert out.finish_reason == "stop", out.text
            value = json.loads(out.text)
            schema = prompt_params.guided
            if schema.get("json_schema"):
                check(value, schema["json_schema"]["schema"])
            else:
                assert isinstance(value, dict)


def test_max_tokens_cuts_a_guided_reply_with_finish_reason_length(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=256) as engine:
        out = engine.generate([[5, 6]], SamplingParams(temperature=0, guided=fmt(MIXED), max_tokens=7), progress=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert out.text == '{"name"'  # the forced start of the reply, incomplete JSON


def test_a_request_is_checked_once_and_given_one_guide(tiny_ckpt, monkeypatch):
    """Checking a guided prompt compiles its format once and builds no guide; each request
    (each of n choices) gets its own guide, built when it is queued."""
    import eeyore.serve.engine as engine_module

    compiled, guides = [], []
    monkeypatch.setattr(engine_module, "compile_format", lambda f: compiled.append(f) or compile_format(f))
    monkeypatch.setattr(engine_module, "Guide", lambda *a: guides.append(a) or Guide(*a))
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=256) as engine:
        params = SamplingParams(temperature=0, guided=fmt(SCORE), max_tokens=50)
        engine.generate([[5, 6]], params, progress=False)  # a raw dict, checked inside submit
        assert (len(compiled), len(guides)) == (1, 1)
        node = compile_format(fmt(SCORE))  # as the server passes it: compiled by the protocol layer
        server_params = SamplingParams(temperature=0, guided=node, max_tokens=50)
        budget = engine.check_prompt([5, 6], server_params)
        assert len(guides) == 1
        reqs = [engine.submit([5, 6], server_params, lambda out: None, max_tokens=budget) for _ in range(2)]
        assert len(compiled) == 1 and len(guides) == 3 and reqs[0].guide is not reqs[1].guide


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=4, max_model_len=512))
    yield srv
    srv.close()


def test_openai_client_gets_schema_valid_replies_streamed_or_not(server):
    client = server.client()
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt(MIXED),
                                           max_tokens=400, seed=7, n=2)
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        check(json.loads(choice.message.content), MIXED)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_object"},
                                                max_tokens=1000, seed=8, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and isinstance(json.loads("".join(pieces)), dict)
    text = client.completions.create(model="tiny", prompt="x", max_tokens=50, temperature=0,
                                     extra_body={"response_format": fmt(SCORE)}).choices[0].text
    check(json.loads(text), SCORE)


def test_unsupported_response_format_is_a_400_naming_the_keyword(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                response_format=fmt({"type": "string", "pattern": "a+"}))
    body = err.value.body
    assert body["param"] == "response_format" and "'pattern'" in body["message"]


def test_guided_rows_never_disturb_an_unconstrained_bystander(server, tiny_hf):
    client, messages = server.client(), [{"role": "user", "content": "hi"}]
    expected = hf_greedy(tiny_hf, server.engine.encode_chat(messages), 150, min_new_tokens=150)
    first, pieces = threading.Event(), []

    def bystander():
        for chunk in client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                                    max_tokens=150, extra_body={"ignore_eos": True}):
            first.set()
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")

    thread = threading.Thread(target=bystander)
    thread.start()
    assert first.wait(60)
    guided = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt(MIXED), n=3,
                                            max_tokens=400, temperature=1.0, seed=3)
    thread.join(120)
    assert "".join(pieces) == server.engine.tokenizer.decode(expected, skip_special_tokens=True)
    for choice in guided.choices:
        check(json.loads(choice.message.content), MIXED)


def test_embedded_model_through_the_server_follows_the_schema(smollm2_dir):
    """The embedded model, through the official client: a judge's score and a mixed schema."""
    srv = LiveServer(lambda: Engine.from_pretrained(smollm2_dir, max_batch_size=4, max_model_len=2048), name="smol")
    try:
        client = srv.client()
        ask = [{"role": "user", "content": "Rate from 1 to 5 how sad this sounds: 'I can't sleep any more.'"}]
        scores = client.chat.completions.create(model="smol", messages=ask, response_format=fmt(SCORE), n=3,
                                                max_tokens=20, temperature=1.0, seed=1)
        for choice in scores.choices:
            check(json.loads(choice.message.content), SCORE)
        describe = [{"role": "user", "content": "Describe a tired client as JSON."}]
        pieces = []
        for chunk in client.chat.completions.create(model="smol", messages=describe, response_format=fmt(MIXED),
                                                    max_tokens=300, temperature=0.8, seed=2, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
        check(json.loads("".join(pieces)), MIXED)
    finally:
        srv.close()
