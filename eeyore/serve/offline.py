"""Offline generation over the engine: a batch of prompts in, their completions out.

The engine's `generate` (blocking, with a progress bar) and `agenerate` (async) are these two
functions; they submit every prompt unbounded by the queue (offline work waits its turn rather
than getting 429) and raise EngineError if any request failed.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .params import SamplingParams
from .request import Completion, EngineError, Output

if TYPE_CHECKING:
    from .engine import Engine

Prompt = str | Sequence[int] | list[dict[str, Any]]  # text, token ids, or chat messages
Params = SamplingParams | Sequence[SamplingParams] | None


def prompt_ids(engine: "Engine", prompt: Prompt) -> list[int]:
    """Messages through the chat template (a final assistant message is continued), strings
    encoded as they are, token ids as given."""
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        return engine.encode_chat(prompt, continue_final=prompt[-1].get("role") == "assistant")
    return list(prompt)


def per_prompt(engine: "Engine", prompts: Sequence[Prompt], params: Params) -> list[SamplingParams]:
    params = params if params is not None else engine.defaults
    out = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(out) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(out)} sampling parameters")
    return out


def generate(engine: "Engine", prompts: Sequence[Prompt], params: Params, progress: bool) -> list[Completion]:
    per = per_prompt(engine, prompts, params)
    engine.start()
    results = [Completion() for _ in prompts]
    left = threading.Semaphore(0)
    bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not progress)

    def sink_for(i: int) -> Callable[[Output], None]:
        def sink(out: Output) -> None:
            results[i].add(out)
            if out.finish_reason is not None:
                bar.update(1)
                left.release()
        return sink

    reqs = [engine.submit(prompt_ids(engine, p), sp, sink_for(i), bounded=False) for i, (p, sp) in enumerate(zip(prompts, per))]
    try:
        for _ in reqs:
            left.acquire()
    finally:
        for r in reqs:
            if not r.done:
                engine.abort(r)
        bar.close()
    return _raise_failed(results)


async def agenerate(engine: "Engine", prompts: Sequence[Prompt], params: Params) -> list[Completion]:
    engine.start()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = [engine.submit_async(prompt_ids(engine, p), sp, queue, i, bounded=False)
            for i, (p, sp) in enumerate(zip(prompts, per_prompt(engine, prompts, params)))]
    results = [Completion() for _ in prompts]
    try:
        left = len(reqs)
        while left:
            i, out = await queue.get()
            results[i].add(out)
            left -= out.finish_reason is not None
    finally:
        for r in reqs:
            if not r.done:
                engine.abort(r)
    return _raise_failed(results)


def _raise_failed(results: list[Completion]) -> list[Completion]:
    failed = [r.text for r in results if r.finish_reason == "error"]
    if failed:
        raise EngineError(failed[0])
    return results
