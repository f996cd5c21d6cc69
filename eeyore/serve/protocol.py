"""The OpenAI wire format: request validation into engine inputs, and the response bodies.

Every client mistake becomes an `ErrorReply` with a 4xx status and the OpenAI error envelope
naming the offending field. Unknown fields are ignored, as OpenAI's own API does, except
features that would silently change the answer (tools, echo, suffix). Structured output
(`response_format` json_object / json_schema) is followed by constrained decoding: `guided.py`.
Extensions beyond OpenAI's fields, as vLLM names them: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, plus transformers' `sequence_bias` and
`exponential_decay_length_penalty`.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .guided_schema import GuidedError, compile_format
from .params import RANGES, ParamError, SamplingParams, check_number, check_params, parse_sequence_bias

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "suffix")
MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 4096  # the server's --max-messages default
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²" and "١" pass str.isdigit()


class ErrorReply(Exception):
    """An error the server answers with: its HTTP status and OpenAI's error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ErrorReply:
    return ErrorReply(400, message, param, code)


@dataclass
class ParsedRequest:
    """A validated request: the messages (chat) or prompts (completions) and how to run them."""

    model: str | None
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    messages: list[dict[str, str]] | None = None
    prompts: list[str | list[int]] | None = None


# ----------------------------------------------------------------------------- field readers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None, integer: bool = False) -> Any:
    """A numeric field, None when absent. Fields of SamplingParams are held to params.RANGES;
    others to [lo, hi]. NaN and infinities (which Python's JSON reader accepts) are refused."""
    v = body.get(name)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if not (_is_int(v) or (not integer and isinstance(v, float))):
        raise bad(f"'{name}' must be {kind}, got {type(v).__name__}", name)
    field_name = "max_tokens" if name == "max_completion_tokens" else name
    try:
        if field_name in RANGES:
            check_number(field_name, v, f"'{name}'")
        elif not ((_is_int(v) or math.isfinite(v)) and lo <= v <= hi):
            raise ParamError(name, f"'{name}' must be >= {lo} and <= {hi}, got {v}")
    except ParamError as exc:
        raise bad(str(exc), name) from None
    return v if integer else float(v)


def _text(v: Any, where: str) -> str:
    """A string the tokenizer can take: a lone surrogate (JSON allows "\\ud800") is no text."""
    if not isinstance(v, str):
        raise bad(f"{where} must be a string", where)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where} is not valid Unicode text (a lone surrogate)", where) from None
    return v


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def _stop(body: dict) -> tuple[str, ...] | None:
    v = body.get("stop")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 16:
        raise bad("'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    return tuple(_text(s, "stop") for s in items)


def _token_ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise bad(f"'{name}' must be a list of token ids (integers >= 0)", name)
    return v


def _sampling(body: dict, defaults: SamplingParams) -> SamplingParams:
    max_tokens = _number(body, "max_completion_tokens", integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True)
    top_k = _number(body, "top_k", integer=True)
    bias = defaults.sequence_bias
    if body.get("sequence_bias") is not None:
        try:
            bias = parse_sequence_bias(body["sequence_bias"])
        except ValueError as exc:
            raise bad(str(exc), "sequence_bias") from None
    if body.get("logit_bias") is not None:
        bias = bias + _logit_bias(body["logit_bias"])
    decay = body.get("exponential_decay_length_penalty")
    if decay is not None:
        if not (isinstance(decay, list) and len(decay) == 2 and _is_int(decay[0])
                and isinstance(decay[1], (int, float)) and not isinstance(decay[1], bool)):
            raise bad("'exponential_decay_length_penalty' must be [start >= 0, factor > 0]", "exponential_decay_length_penalty")
        decay = (decay[0], _float(decay[1], "exponential_decay_length_penalty"))
    stop_ids = body.get("stop_token_ids")
    params = defaults.updated(
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=None if top_k is None else max(top_k, 0),  # -1 and 0 both mean off
        min_p=_number(body, "min_p"),
        repetition_penalty=_number(body, "repetition_penalty"),
        presence_penalty=_number(body, "presence_penalty"),
        frequency_penalty=_number(body, "frequency_penalty"),
        seed=_number(body, "seed", integer=True),
        max_tokens=max_tokens,
        stop=_stop(body),
        stop_token_ids=None if stop_ids is None else tuple(_token_ids(stop_ids, "stop_token_ids")),
        ignore_eos=_bool(body, "ignore_eos"),
        sequence_bias=bias,
        exponential_decay_length_penalty=decay,
    )
    try:  # what the field readers cannot see alone: biases and the decay pair
        check_params(params)
    except ParamError as exc:
        raise bad(str(exc), exc.field) from None
    return params


def _float(v: int | float, where: str) -> float:
    try:
        return float(v)
    except OverflowError:  # an integer with hundreds of digits
        raise bad(f"'{where}': {str(v)[:20]}... is too large", where) from None


def _logit_bias(v: Any) -> tuple[tuple[tuple[int, ...], float], ...]:
    if not isinstance(v, dict):
        raise bad("'logit_bias' must map token ids to biases", "logit_bias")
    out = []
    for key, bias in v.items():
        if not (TOKEN_ID.fullmatch(key) and isinstance(bias, (int, float)) and not isinstance(bias, bool)
                and -100 <= bias <= 100):  # also false for NaN
            raise bad(f"'logit_bias' entry {key!r}: expected a token id and a bias in [-100, 100]", "logit_bias")
        out.append(((int(key),), float(bias)))
    return tuple(out)


def _common(body: Any, defaults: SamplingParams) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name)
    try:  # a JSON object or schema: constrained decoding (see guided.py)
        guided = None if body.get("response_format") is None else compile_format(body["response_format"])
    except GuidedError as exc:
        raise bad(str(exc), "response_format") from None
    model = body.get("model")
    if model is not None:
        _text(model, "model")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("'stream_options' is only allowed with stream: true, as an object", "stream_options")
    include_usage = bool(_bool(options or {}, "include_usage"))
    n = _number(body, "n", 1, MAX_N, integer=True) or 1
    return ParsedRequest(model, _sampling(body, defaults).updated(guided=guided), n, stream, include_usage)


# ----------------------------------------------------------------------------- requests


def parse_chat(body: Any, defaults: SamplingParams, max_messages: int = MAX_MESSAGES) -> ParsedRequest:
    req = _common(body, defaults)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise bad(f"'messages' has {len(messages)} messages: this server takes at most {max_messages}", "messages")
    req.messages = [_message(m, i) for i, m in enumerate(messages)]
    logprobs = bool(_bool(body, "logprobs"))
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    req.params = req.params.updated(logprobs=logprobs, top_logprobs=top or 0)
    return req


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{where} must be an object", where)
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is meaningful to this model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad(f"{where}.content: only parts of type 'text' are supported", f"{where}.content")
        content = "".join(p["text"] for p in content)
    return {"role": ROLES[role], "content": _text(content, f"{where}.content")}


def parse_completion(body: Any, defaults: SamplingParams) -> ParsedRequest:
    req = _common(body, defaults)
    if body.get("echo"):
        raise bad("'echo' is not supported by this server", "echo")
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise bad("'best_of' other than n is not supported", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    for p in prompts:
        if isinstance(p, list):
            _token_ids(p, "prompt")
        else:
            _text(p, "prompt")
    req.prompts = prompts
    top = _number(body, "logprobs", 0, 5, integer=True)
    req.params = req.params.updated(logprobs=top is not None, top_logprobs=top or 0)
    return req


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], extra: dict | None = None) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, **(extra or {})}


def chat_logprobs(token_text: list[str], logprobs: list[float | None],
                  tops: list[list[tuple[str, float]] | None]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(t, lp), "top_logprobs": [entry(s, v) for s, v in (top or [])]}
        for t, lp, top in zip(token_text, logprobs, tops)
    ]}


def completion_logprobs(token_text: list[str], logprobs: list[float | None],
                        tops: list[list[tuple[str, float]] | None], offset: int) -> dict[str, Any]:
    offsets = []
    for t in token_text:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": token_text, "token_logprobs": logprobs,
            "top_logprobs": [dict(top or []) for top in tops], "text_offset": offsets}
