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
