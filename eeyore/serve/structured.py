"""Structured replies from any OpenAI-compatible endpoint: send `response_format` while the
endpoint accepts it, and fall back to the plain request once it is known to refuse it.

Our server, vLLM and OpenAI follow a JSON schema by constrained decoding; other servers answer
400 (or 422) to the field. Such an answer may also mean the request is bad for another reason,
so the same request goes again without the field, and only its success marks the endpoint as
refusing: later requests through that client go plain at once. The caller's prompt must then
describe the format in words, and the caller still validates every reply.
"""
from __future__ import annotations

import weakref
from typing import Any

from .client import ChatClient, EndpointError, Sampling

# client -> whether its endpoint accepts response_format (absent: not known yet)
_ACCEPTS: "weakref.WeakKeyDictionary[ChatClient, bool]" = weakref.WeakKeyDictionary()


def accepts_format(client: ChatClient) -> bool | None:
    """True / False once a request told; None before."""
    return _ACCEPTS.get(client)


async def chat_formatted(client: ChatClient, messages: list[dict[str, str]], sampling: Sampling | None,
                         response_format: dict[str, Any]) -> str:
    """The reply text, asked with `response_format` unless the endpoint is known to refuse it."""
    if _ACCEPTS.get(client) is False:
        return await client.chat(messages, sampling)
    try:
        reply = await client.chat(messages, sampling, response_format)
    except EndpointError as e:
        if e.status not in (400, 422):
            raise
        reply = await client.chat(messages, sampling)  # raises when the request itself is bad
        _ACCEPTS[client] = False
        return reply
    _ACCEPTS[client] = True
    return reply
