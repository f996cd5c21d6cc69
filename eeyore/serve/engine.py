"""Continuous batching over the KV cache, for the server and for offline generation alike.

One worker thread owns the model; callers on any thread (or event loop) submit requests and
receive `Output` deltas through a callback. Each loop iteration:

1. drops cancelled requests, freeing their slots at once;
2. prefills waiting requests one at a time into the next free slot, within a token budget, so
   a long prompt is cut into chunks and never stalls the running streams for long (a prefix
   shared with a running row is copied from its slot rather than computed);
3. runs one batched decode step over every running slot and samples a token per row.

A prompt is prefilled except for its last token, which the next decode step feeds like any
other row's last token: so every token, the first included, is chosen by the one batched
sampler call. Running sequences stay packed in slots [0, n) (a leaver's slot is refilled by
moving the last row into it) so the decode step is one forward over `cache.rows(0, n)`.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eeyore.model import KVCache, Llama
from eeyore.model.chat import ChatTemplate, TemplateError
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.pretrained import resolve_model_dir

from .params import SamplingParams, checkpoint_defaults, eos_ids_of, layered_defaults
from .request import (Completion, ContextLengthError, EngineClosed, EngineError, EngineFull, InvalidRequest, Output,
                      Request)
from .sampler import Sampler
from .text import TextStream


Prompt = str | Sequence[int] | list[dict[str, Any]]  # text, token ids, or chat messages
MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a copy


class Engine:
    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_model_len: int | None = None,
        overrides: dict[str, Any] | None = None,
        prefill_chunk: int = 512,
        chat_template: str | None = None,
        seed: int | None = None,
        pack_weights: bool = False,
    ) -> None:
        config = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.max_model_len = min(max_model_len or 4096, config.max_position_embeddings)
        # HF defaults < generation_config.json < `overrides` (the server's flags) < each request
        self.defaults = layered_defaults(checkpoint_defaults(model.generation_config), overrides or {})
        self.eos_ids = eos_ids_of(model.generation_config, config.eos_token_id)
        has_template = chat_template is not None or tokenizer.chat_template is not None
        self.template = ChatTemplate.for_tokenizer(tokenizer, chat_template) if has_template else None
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None  # allocated by the worker thread: see `_run`
        self.sampler = Sampler(config.vocab_size, self.eos_ids, seed)
        self.live: weakref.WeakSet[Request] = weakref.WeakSet()  # lets tests see that nothing leaks
        self.reused_prefix_tokens = 0  # prompt tokens taken from the cache instead of computed
        self.pack_weights = pack_weights
        # Free slots keep the keys and values of the request that left them, until overwritten:
        # slot -> the tokens whose entries are there. A follow-up request (the next turn of a
        # conversation resends the whole history) then prefills only what is new.
        self._retired: dict[int, list[int]] = {}
        self._ids = itertools.count()
        self._inbox: deque[Request] = deque()
        self._wake = threading.Condition()
        self._queued = 0  # submitted and not yet prefilling: the bounded queue
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # slot i holds _running[i]
        self._prefilling: Request | None = None  # at slot len(_running)
        self._rows_changed = True
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                        device: str = "cpu", **kwargs: Any) -> "Engine":
        """Load a checkpoint (None: the embedded default model) and its tokenizer.

        The model is the engine's own, so by default (`pack_weights=True`) the worker packs its
        fp32 CPU weights for faster decoding, which leaves it inference-only.
        """
        model_dir = resolve_model_dir(model)
        kwargs.setdefault("pack_weights", True)
        return cls(Llama.from_pretrained(model_dir, dtype, device), Tokenizer.from_pretrained(model_dir), **kwargs)

    # ------------------------------------------------------------------ callers' side

    def start(self) -> "Engine":
        """Start the worker; raises what its set-up raised (packing, the KV cache allocation)."""
        if self._thread is None:
            self._closing = False
            ready: list[BaseException | None] = []
            self._thread = threading.Thread(target=self._run, args=(ready,), name="eeyore-engine", daemon=True)
            self._thread.start()
            with self._wake:
                self._wake.wait_for(lambda: ready)
            if ready[0] is not None:
                self._thread.join()
                self._thread = None
                raise ready[0]
        return self

    def close(self) -> None:
        """Stop the worker; requests still in flight finish with an error."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self._running)

    def encode_chat(self, messages: list[dict[str, Any]], continue_final: bool = False) -> list[int]:
        """Token ids of a conversation with a generation prompt, or, with `continue_final`, with
        the last (assistant) message left open so the model carries it on."""
        if self.template is None:
            raise TemplateError(f"{self.tokenizer.source} has no chat template: pass one (e.g. --chat-template llama3)")
        if continue_final and not (messages[-1].get("content") or "").strip():
            messages, continue_final = messages[:-1], False  # nothing to continue: a fresh turn
        return self.tokenizer.encode(self.template.render_prompt(messages, continue_final))

    def check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """The number of tokens the request may generate; InvalidRequest names what is wrong."""
        n = len(prompt)
        if n == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        for key, _ in params.sequence_bias:  # logit_bias arrives here too
            if not all(0 <= t < vocab for t in key):
                raise InvalidRequest(f"sequence_bias / logit_bias token ids {list(key)} are outside the vocabulary "
                                     f"(0..{vocab - 1})", "sequence_bias")
        room = self.max_model_len - n
        if room <= 0:
            raise ContextLengthError(f"the prompt has {n} tokens but the context length is {self.max_model_len}: "
                                     f"at most {self.max_model_len - 1} prompt tokens")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(f"the context length is {self.max_model_len} tokens but {n + params.max_tokens} "
                                     f"were requested ({n} in the prompt, {params.max_tokens} to generate)")
        return params.max_tokens

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Output], None],
               bounded: bool = True) -> Request:
        """Queue a request; `sink` receives its outputs on the worker thread."""
        prompt = list(prompt)
        max_tokens = self.check_prompt(prompt, params)
        # The prompt's last ids as context: SentencePiece decoders then keep the first token's space.
        decoder = self.tokenizer.stream_decoder(prompt[-4:], skip_special_tokens=True)
        text = TextStream(decoder, params.stop, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        req = Request(next(self._ids), prompt, params, max_tokens, text, sink)
        with self._wake:
            if self._closing or self._thread is None:
                raise EngineClosed("the engine is not running")
            if bounded and self._queued >= self.max_queue:
                raise EngineFull(f"{self._queued} requests are already waiting (the bound is {self.max_queue})")
            self._queued += 1
            self._inbox.append(req)
            self.live.add(req)
            self._wake.notify()
        return req

    def abort(self, req: Request) -> None:
        """Cancel a request from any thread; its slot is freed before the next step."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    def submit_async(self, prompt: Sequence[int], params: SamplingParams, queue: asyncio.Queue, tag: Any = None,
                     bounded: bool = True) -> Request:
        """Queue a request whose outputs arrive as `(tag, output)` on an asyncio queue of the
        running loop; several requests may share one queue. The caller aborts the requests it
        stops listening to."""
        loop = asyncio.get_running_loop()
        return self.submit(prompt, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, (tag, out)), bounded)

    async def agenerate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """`generate` for async callers: waits without blocking the event loop."""
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = [self.submit_async(self._prompt_ids(p), sp, queue, i, bounded=False)
                for i, (p, sp) in enumerate(zip(prompts, self._per_prompt(prompts, params)))]
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
                    self.abort(r)
        return _raise_failed(results)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = True) -> list[Completion]:
        """Offline generation, from any thread but the worker's (a progress bar shows finished
        requests). Lists of messages go through the chat template (a final assistant message is
        continued), strings are encoded as they are, token ids are used as given. `params` is
        one `SamplingParams` for all prompts or one per prompt; None: the engine's defaults."""
        per_prompt = self._per_prompt(prompts, params)
        self.start()
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

        reqs = [self.submit(self._prompt_ids(p), sp, sink_for(i), bounded=False)
                for i, (p, sp) in enumerate(zip(prompts, per_prompt))]
        try:
            for _ in reqs:
                left.acquire()
        finally:
            for r in reqs:
                if not r.done:
                    self.abort(r)
            bar.close()
        return _raise_failed(results)

    def _per_prompt(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None) -> list[SamplingParams]:
        params = params if params is not None else self.defaults
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling parameters")
        return per_prompt

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.encode_chat(prompt, continue_final=prompt[-1].get("role") == "assistant")
        return list(prompt)

    # ------------------------------------------------------------------ the worker

    def _set_up(self) -> None:
        # All tensor work happens on the worker thread, weight packing and the cache's first fill
        # included: once a thread has run an OpenMP parallel region, libgomp runs another
        # thread's regions about 2x slower on this 2-core CPU (measured: 22 vs 42 tok/s at batch 1).
        if self.pack_weights:  # inference-only from here: see Llama.pack_for_cpu_inference
            self.model.pack_for_cpu_inference()
        if self.cache is None:
            dtype = next(self.model.parameters()).dtype
            self.cache = KVCache(self.model.config, self.max_batch_size, self.max_model_len, dtype, self.device)

    def _run(self, ready: list[BaseException | None]) -> None:
        error = None
        try:
            self._set_up()
        except BaseException as exc:  # handed to start(), which raises it on the caller's thread
            error = exc
        with self._wake:
            ready.append(error)
            self._wake.notify_all()
        if error is not None:
            return
        with torch.inference_mode():
            while self._take_inbox():
                try:
                    self._drop_cancelled()
                    self._prefill()
                    if self._running:
                        self._decode()
                except Exception as exc:  # a model failure ends the requests it touched, not the server
                    self._fail_all(f"{type(exc).__name__}: {exc}", waiting=False)
        self._fail_all("the engine was shut down", waiting=True)

    def _take_inbox(self) -> bool:
        """Move new requests to the waiting line; sleep while there is nothing to do."""
        with self._wake:
            while not (self._inbox or self._waiting or self._running or self._prefilling or self._closing):
                self._wake.wait()
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            return not self._closing

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self._waiting):
            kept = [r for r in self._waiting if not r.cancelled]
            with self._wake:
                self._queued -= len(self._waiting) - len(kept)
            self._waiting = deque(kept)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._prefilling = None
        self._remove([i for i, r in enumerate(self._running) if r.cancelled])

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None:
                if not self._waiting or len(self._running) >= self.max_batch_size:
                    return
                self._prefilling = self._waiting.popleft()
                with self._wake:
                    self._queued -= 1
                self._reuse_prefix(self._prefilling, len(self._running))
            req, slot = self._prefilling, len(self._running)
            todo = min(len(req.prompt) - 1 - req.prefilled, budget)
            if todo > 0:  # the last prompt token is left to the decode step
                start = req.prefilled
                ids = torch.tensor([req.prompt[start : start + todo]], device=self.device)
                positions = torch.arange(start, start + todo, device=self.device)[None]
                self.model.hidden_states(ids, positions, self.cache.rows(slot, slot + 1))
                req.prefilled += todo
                budget -= todo
            if req.prefilled == len(req.prompt) - 1:
                self._running.append(req)
                self._prefilling = None
                self._rows_changed = True

    def _decode(self) -> None:
        running = self._running
        if self._rows_changed:
            self.sampler.set_rows([r.row for r in running])
            self._rows_changed = False
        ids = torch.tensor([[r.row.tokens[-1]] for r in running], device=self.device)
        positions = torch.tensor([[len(r.row.tokens) - 1] for r in running], device=self.device)
        logits = self.model(ids, positions, self.cache.rows(0, len(running)))[:, -1]
        sampled = self.sampler(logits.cpu())
        finished = []
        for i, req in enumerate(running):
            token = sampled.tokens[i]
            req.row.tokens.append(token)
            req.generated += 1
            if self._is_stop_token(token, req.params):
                text, reason = req.text.flush(), "stop"
            else:
                text, hit = req.text.push(token)
                reason = "stop" if hit else None
            if reason is None and req.generated >= req.max_tokens:
                text, reason = text + req.text.flush(), "length"
            req.emit(Output([token], text, [sampled.logprobs[i]], [sampled.top_logprobs[i]], reason,
                            len(req.prompt), req.generated))
            if reason is not None or req.cancelled:
                finished.append(i)
        self._remove(finished)

    def _is_stop_token(self, token: int, params: SamplingParams) -> bool:
        return (not params.ignore_eos and token in self.eos_ids) or token in params.stop_token_ids

    def _remove(self, indices: list[int]) -> None:
        """Free the slots of these running rows, keeping the others packed in [0, n)."""
        if not indices:
            return
        running = self._running
        before = len(running)
        for i in sorted(indices, reverse=True):  # later leavers first: the last row is never one
            last = len(running) - 1
            cached = running[i].row.tokens[:-1]  # the last sampled token was never fed
            if i != last:  # swap slots, so the leaver's entries stay in the cache at `last`
                self.cache.swap_slots(i, last, len(cached), len(running[last].row.tokens) - 1)
                running[i] = running[last]
            self._retired[last] = cached
            running.pop()
        if self._prefilling is not None and self._prefilling.prefilled:
            self._copy_slot(before, len(running), self._prefilling.prefilled)
        self._rows_changed = True

    def _reuse_prefix(self, req: Request, slot: int) -> None:
        """Take the cached keys and values of the longest prompt prefix shared with a running row
        or a retired slot instead of computing them again (attention is causal: the same tokens
        give the same entries). A profile's system prompt, the prompt of n > 1 choices, or the
        history a conversation's next turn resends, is prefilled once."""
        limit, best, src = len(req.prompt) - 1, 0, -1
        cached = [(i, other.row.tokens[:-1]) for i, other in enumerate(self._running)]
        for i, tokens in [*cached, *self._retired.items()]:
            k = _shared_prefix_length(tokens, req.prompt, limit)
            if k > best or (k == best and i == slot):  # ties: the slot itself needs no copy
                best, src = k, i
        if best >= MIN_SHARED_PREFIX and src != slot:
            self._copy_slot(src, slot, best)
        self._retired.pop(slot, None)  # the new request writes here from now on
        if best >= MIN_SHARED_PREFIX:
            req.prefilled = best
            self.reused_prefix_tokens += best

    def _copy_slot(self, src: int, dst: int, length: int) -> None:
        self._retired.pop(dst, None)  # whatever was kept in dst is overwritten
        self.cache.copy_slot(src, dst, length)

    def _fail_all(self, message: str, waiting: bool) -> None:
        reqs = self._running + ([self._prefilling] if self._prefilling else [])
        if waiting:
            with self._wake:
                reqs += list(self._waiting) + list(self._inbox)
                self._waiting.clear()
                self._inbox.clear()
                self._queued = 0
        for r in reqs:
            r.emit(Output([], message, [], [], "error", len(r.prompt), r.generated))
        self._running, self._prefilling, self._rows_changed = [], None, True
        self._retired.clear()  # a failed step may have left any slot half-written


def _shared_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _raise_failed(results: list[Completion]) -> list[Completion]:
    failed = [r.text for r in results if r.finish_reason == "error"]
    if failed:
        raise EngineError(failed[0])
    return results
