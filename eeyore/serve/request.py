"""What flows through the engine: a request's state, the outputs it yields, and the errors."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .guided import Guide
from .params import SamplingParams
from .text import TextStream


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: try again later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is not running (HTTP 503)."""


class EngineError(RuntimeError):
    """The model failed while running a request (HTTP 500)."""


class InvalidRequest(ValueError):
    """A request the engine cannot run (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthError(InvalidRequest):
    """Prompt plus completion do not fit the context length."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "prompt", "context_length_exceeded")


@dataclass
class Output:
    """What one step adds to a request. `text` may lag `token_ids` while it could still be the
    start of a stop string or of a multi-byte character."""

    token_ids: list[int]
    text: str
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    finish_reason: str | None  # "stop", "length", or "error" (then `text` holds the message)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """A finished request: the sum of its outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0

    def add(self, out: Output) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.finish_reason = out.finish_reason
        self.prompt_tokens = out.prompt_tokens


class TraceRow(NamedTuple):
    """One row of one forward: at loop iteration `step`, KV-cache slot `slot` computed `tokens`
    tokens of request `request` (its id) in `phase` "prefill" or "decode"."""

    step: int
    slot: int
    request: int
    phase: str
    tokens: int


class Request:
    """One sequence in the engine: its prompt, the tokens it has so far, and where its outputs
    go. The worker thread owns everything but `cancelled`."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, max_tokens: int,
                 text: TextStream, sink: Callable[[Output], None], guide: Guide | None = None) -> None:
        self.id, self.prompt, self.params, self.max_tokens = rid, prompt, params, max_tokens
        self.tokens = list(prompt)  # prompt + generated: what the sampler's penalties and biases read
        self.prompt_len = len(prompt)
        # A seeded request draws from its own generator, so its tokens do not depend on the batch.
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.text, self.sink = text, sink
        self.guide = guide  # the tokens response_format allows next; None: any
        self.prefilled = 0  # prompt tokens already in the cache
        self.cancelled = False
        self.done = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys and values are in the cache once it runs: all but the last,
        which the next decode step feeds."""
        return self.tokens[:-1]

    def emit(self, out: Output) -> None:
        if out.finish_reason is not None:
            self.done = True
        try:
            self.sink(out)
        except RuntimeError:  # the receiving event loop is gone: nobody is listening any more
            self.cancelled = True

    def fail(self, message: str) -> None:
        self.emit(Output([], message, [], [], "error", self.prompt_len, self.generated))
