"""The aiohttp chat client: same request as the official openai client, retries, clear errors."""
import asyncio

import pytest
from eval_fakes import FakeEndpoint

from eeyore.serve.client import ChatClient, EndpointError, Sampling

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_request_matches_the_official_openai_client():
    openai = pytest.importorskip("openai")

    async def go():
        async with FakeEndpoint(lambda body: "hello") as ep:
            ours = ChatClient(ep.base_url, "m", api_key="sk-test")
            text = await ours.chat(MESSAGES, Sampling(temperature=0.7, top_p=0.9, max_tokens=32))
            await ours.close()
            theirs = openai.AsyncOpenAI(base_url=ep.base_url, api_key="sk-test", max_retries=0)
            resp = await theirs.chat.completions.create(model="m", messages=MESSAGES, temperature=0.7, top_p=0.9,
                                                        max_tokens=32)
            await theirs.close()
            return text, resp.choices[0].message.content, ep

    text, their_text, ep = asyncio.run(go())
    assert text == their_text == "hello"
    assert ep.requests[0] == ep.requests[1]
    assert ep.headers[0]["Authorization"] == ep.headers[1]["Authorization"] == "Bearer sk-test"


def test_response_format_is_sent_as_the_official_client_sends_it():
    openai = pytest.importorskip("openai")
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {}}}}

    async def go():
        async with FakeEndpoint(lambda body: "{}") as ep:
            async with ChatClient(ep.base_url, "m") as ours:
                await ours.chat(MESSAGES, response_format=fmt)
            theirs = openai.AsyncOpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
            await theirs.chat.completions.create(model="m", messages=MESSAGES, response_format=fmt)
            await theirs.close()
            return ep.requests

    ours, theirs = asyncio.run(go())
    assert ours == theirs and ours["response_format"] == fmt


def test_unset_sampling_values_are_left_to_the_server():
    async def go():
        async with FakeEndpoint(lambda body: "ok") as ep, ChatClient(ep.base_url, "m") as c:
            await c.chat(MESSAGES, Sampling(max_tokens=8))
            return ep.requests[0], ep.headers[0]

    body, headers = asyncio.run(go())
    assert body == {"model": "m", "messages": MESSAGES, "max_tokens": 8}
    assert "Authorization" not in headers


def test_transient_errors_are_retried():
    statuses = iter([(503, "loading"), (429, "slow down"), "finally"])

    async def go():
        async with FakeEndpoint(lambda body: next(statuses)) as ep:
            async with ChatClient(ep.base_url, "m", backoff_s=0.001) as c:
                return await c.chat(MESSAGES), len(ep.requests), c.requests

    assert asyncio.run(go()) == ("finally", 3, 1)


def test_client_errors_fail_at_once_with_the_server_message():
    async def go():
        async with FakeEndpoint(lambda body: (400, "max_tokens must be positive")) as ep:
            async with ChatClient(ep.base_url, "m", backoff_s=0.001) as c:
                with pytest.raises(EndpointError, match="HTTP 400: max_tokens must be positive") as err:
                    await c.chat(MESSAGES)
                return err.value.status, len(ep.requests)

    assert asyncio.run(go()) == (400, 1)


def test_gives_up_after_the_retries():
    async def go():
        async with FakeEndpoint(lambda body: (500, "boom")) as ep:
            async with ChatClient(ep.base_url, "m", retries=2, backoff_s=0.001) as c:
                with pytest.raises(EndpointError, match="failed after 3 attempts; last error: HTTP 500: boom"):
                    await c.chat(MESSAGES)
                return len(ep.requests)

    assert asyncio.run(go()) == 3


def test_unreachable_endpoint_is_reported():
    async def go():
        async with ChatClient("http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.001) as c:
            with pytest.raises(EndpointError, match="127.0.0.1:9/v1/chat/completions failed after 2 attempts"):
                await c.chat(MESSAGES)

    asyncio.run(go())


# ---------------------------------------------------------------------------- streaming


def test_stream_request_matches_the_official_openai_client():
    openai = pytest.importorskip("openai")
    extra = {"sequence_bias": [[[7], -4.0]], "exponential_decay_length_penalty": [0, 1.01]}

    async def go():
        async with FakeEndpoint(lambda body: "hello there, counsellor") as ep:
            async with ChatClient(ep.base_url, "m", api_key="sk-test") as ours:
                reply = ours.stream(MESSAGES, Sampling(temperature=1.0, top_p=0.8, max_tokens=32, seed=5), extra)
                deltas = [d async for d in reply]
            theirs = openai.AsyncOpenAI(base_url=ep.base_url, api_key="sk-test", max_retries=0)
            chunks = await theirs.chat.completions.create(model="m", messages=MESSAGES, temperature=1.0, top_p=0.8,
                                                          max_tokens=32, seed=5, stream=True, extra_body=extra)
            their_deltas, their_finish = [], None
            async for chunk in chunks:
                their_deltas += [chunk.choices[0].delta.content] if chunk.choices[0].delta.content else []
                their_finish = chunk.choices[0].finish_reason or their_finish
            await theirs.close()
            return deltas, reply.finish_reason, their_deltas, their_finish, ep.requests

    deltas, finish, their_deltas, their_finish, (ours, theirs) = asyncio.run(go())
    assert deltas == their_deltas == ["hel", "lo ", "the", "re,", " co", "uns", "ell", "or"]
    assert finish == their_finish == "stop"
    assert ours == theirs and ours["stream"] is True and ours["sequence_bias"] == [[[7], -4.0]]


def test_stream_from_our_server_equals_the_official_client_and_the_whole_reply(tiny_ckpt):
    from serve_fixtures import LiveServer

    from eeyore.serve.engine import Engine

    server = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=4, max_model_len=256))
    greedy = Sampling(temperature=0.0, max_tokens=12)
    try:
        async def ours():
            async with ChatClient(server.url + "/v1", "tiny") as c:
                reply = c.stream(MESSAGES, greedy)
                deltas = [d async for d in reply]
                return deltas, reply.finish_reason, await c.chat(MESSAGES, greedy), c.requests, await c.models()

        deltas, finish, whole, requests, models = asyncio.run(ours())
        chunks = server.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=0.0,
                                                         max_tokens=12, stream=True)
        theirs = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    finally:
        server.close()
    assert "".join(deltas) == "".join(t for t, _ in theirs) == whole and len(deltas) > 1
    assert finish == [f for _, f in theirs if f][-1] == "length"
    assert requests == 2 and models == ["tiny"]


def test_stream_errors_are_one_line_endpoint_errors():
    async def go(respond, **kw):
        async with FakeEndpoint(respond) as ep, ChatClient(ep.base_url, "m", backoff_s=0.001, **kw) as c:
            got = []
            with pytest.raises(EndpointError) as err:
                async for d in c.stream(MESSAGES):
                    got.append(d)
            return got, err.value, len(ep.requests)

    got, err, n = asyncio.run(go(lambda body: ["Well, ", {"error": {"message": "the model failed: out of memory"}}]))
    assert got == ["Well, "] and n == 1  # nothing is retried once text has arrived
    assert str(err).endswith("reported an error mid-reply: the model failed: out of memory") and "\n" not in str(err)
    got, err, n = asyncio.run(go(lambda body: (400, "the context length is 512 tokens")))
    assert (got, err.status, n) == ([], 400, 1) and "refused the request: HTTP 400: the context length" in str(err)
    got, err, n = asyncio.run(go(lambda body: (503, "loading"), retries=1))
    assert (got, n) == ([], 2) and "failed after 2 attempts; last error: HTTP 503: loading" in str(err)


def test_an_unreachable_models_list_is_one_error():
    async def go(url):
        async with ChatClient(url, "x", retries=0) as c:
            return await c.models()

    with pytest.raises(EndpointError, match="cannot reach http://127.0.0.1:9/v1/models"):
        asyncio.run(go("http://127.0.0.1:9/v1"))
