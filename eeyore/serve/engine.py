"""Continuous batching over the KV cache, for the server and for offline generation alike.

One worker thread owns the model; callers on any thread (or event loop) submit requests and
receive `Output` deltas through a callback. Each iteration of the step loop:

1. drops cancelled requests, freeing their slots at once;
2. prefills waiting requests in the free slots after the running rows, several in one forward,
   within a token budget, so a long prompt is cut into chunks and never stalls the running
   streams for long (a prefix already in the cache is copied rather than computed: see
   `scheduler.py`);
3. runs one batched decode step over every running slot and samples a token per row.

Invariant: a prompt is prefilled except for its last token, which the next decode step feeds
like any other row's last token; so every token, the first included, is chosen by the one
batched sampler call. Invariant: running rows are packed in slots [0, n) (the scheduler keeps
them so), so the decode step is one forward over `cache.rows(0, n)`.

A step that fails ends only the requests it can be blamed on: a failed prefill's prompts, the
rows the sampler failed on, and every running row only when the decode forward itself raises.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eeyore.model import KVCache, Llama
from eeyore.model.chat import ChatTemplate, TemplateError
from eeyore.model.decode import DecodeStep, for_inference
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.pretrained import resolve_model_dir

from . import offline
from .guided import Guide, GuidedError, JsonVocab, Node, compile_format
from .memory import plan_cache
from .params import SamplingParams, checkpoint_defaults, eos_ids_of, layered_defaults
from .request import Completion, ContextLengthError, EngineClosed, InvalidRequest, Output, Request, TraceRow
from .sampler import Sampler
from .scheduler import Scheduler
from .text import TextStream


class Engine:
    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_model_len: int | None = None,
        memory_fraction: float | None = None,
        overrides: dict[str, Any] | None = None,
        prefill_chunk: int = 512,
        chat_template: str | None = None,
        seed: int | None = None,
        fast_path: dict[str, Any] | None = None,
    ) -> None:
        """`max_model_len` None: the model's own context, bounded by the memory the KV cache may
        take (`memory_fraction` of the free GPU memory or available RAM: see `memory.py`),
        which may also lower `max_batch_size`."""
        config = model.config
        self.model, self.tokenizer, self.prefill_chunk = model, tokenizer, prefill_chunk
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch_size, self.max_model_len = plan_cache(config, self.dtype, self.device, max_batch_size,
                                                             max_model_len, memory_fraction)
        self.max_queue = max_queue
        # HF defaults < generation_config.json < `overrides` (the server's flags) < each request
        self.defaults = layered_defaults(checkpoint_defaults(model.generation_config), overrides or {})
        self.eos_ids = eos_ids_of(model.generation_config, config.eos_token_id)
        has_template = chat_template is not None or tokenizer.chat_template is not None
        self.template = ChatTemplate.for_tokenizer(tokenizer, chat_template) if has_template else None
        self.cache: KVCache | None = None  # allocated by the worker thread: see `_set_up`
        self.sampler = Sampler(config.vocab_size, self.eos_ids, seed, self.device)
        self.scheduler = Scheduler(self.max_batch_size, max_queue)
        self.live: weakref.WeakSet[Request] = weakref.WeakSet()  # lets tests see that nothing leaks
        # kernels / cpu_matmul / compile for `decode.for_inference`, applied by the worker; None:
        # the readable model as given. `decode_logits` is the one call a decode step makes.
        self.fast_path = fast_path
        self.decode_logits: DecodeStep = DecodeStep(model)
        self._ids = itertools.count()
        # Opt-in record of the schedule, one TraceRow per row of every forward (worker thread).
        self.trace: Callable[[TraceRow], None] | None = None
        self.step = 0  # iterations of the step loop that had work
        self._json_vocab: JsonVocab | None = None  # what constrained decoding knows of the tokens
        self._vocab_lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                        device: str = "cpu", **kwargs: Any) -> "Engine":
        """Load a checkpoint (None: the embedded default model) and its tokenizer.

        The model is the engine's own, so by default (`fast_path={}`) the worker swaps in the
        products measured fastest on this machine (possibly packed weights, which leave it
        inference-only) and the kernels `--kernels auto` picks.
        """
        model_dir = resolve_model_dir(model)
        kwargs.setdefault("fast_path", {})
        return cls(Llama.from_pretrained(model_dir, dtype, device), Tokenizer.from_pretrained(model_dir), **kwargs)

    # ------------------------------------------------------------------ callers' side

    def start(self) -> "Engine":
        """Start the worker; raises what its set-up raised (packing, the KV cache allocation)."""
        if self._thread is None:
            self._closing = False
            ready: list[BaseException | None] = []
            self._thread = threading.Thread(target=self._run, args=(ready,), name="eeyore-engine", daemon=True)
            self._thread.start()
            with self.scheduler.lock:
                self.scheduler.lock.wait_for(lambda: ready)
            if ready[0] is not None:
                self._thread.join()
                self._thread = None
                raise ready[0]
        return self

    def close(self) -> None:
        """Stop the worker; requests still in flight finish with an error."""
        with self.scheduler.lock:
            self._closing = True
            self.scheduler.lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def reused_prefix_tokens(self) -> int:
        return self.scheduler.reused_prefix_tokens

    def encode_chat(self, messages: list[dict[str, Any]], continue_final: bool = False) -> list[int]:
        """Token ids of a conversation with a generation prompt, or, with `continue_final`, with
        the last (assistant) message left open so the model carries it on."""
        if self.template is None:
            raise TemplateError(f"{self.tokenizer.source} has no chat template: pass one (e.g. --chat-template llama3)")
        if continue_final and not (messages[-1].get("content") or "").strip():
            messages, continue_final = messages[:-1], False  # nothing to continue: a fresh turn
        return self.tokenizer.encode(self.template.render_prompt(messages, continue_final))

    def out_of_vocab(self, ids: Sequence[int]) -> int | None:
        return next((t for t in ids if not 0 <= t < self.model.config.vocab_size), None)

    def check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """The number of tokens the request may generate; InvalidRequest names what is wrong.

        A budget larger than the room the prompt leaves in the context (`max_tokens` or the
        server's default) is cut to that room, and a reply that runs into it ends with finish
        reason "length"; only a prompt that leaves no room is refused."""
        return self._check(prompt, params)[0]

    def _check(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, Node | None]:
        n, vocab = len(prompt), self.model.config.vocab_size
        if n == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        bad = self.out_of_vocab(prompt)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        for key, _ in params.sequence_bias:  # logit_bias arrives here too
            if self.out_of_vocab(key) is not None:
                raise InvalidRequest(f"sequence_bias / logit_bias token ids {list(key)} are outside the vocabulary "
                                     f"(0..{vocab - 1})", "sequence_bias")
        node = self._response_format(params)
        room = self.max_model_len - n
        if room <= 0:
            raise ContextLengthError(f"the prompt has {n} tokens but the context length is {self.max_model_len}: "
                                     f"at most {self.max_model_len - 1} prompt tokens")
        return (room if params.max_tokens is None else min(params.max_tokens, room)), node

    def _response_format(self, params: SamplingParams) -> Node | None:
        """The request's response_format compiled (a raw dict here; the server's already is).
        The first guided request builds the tokens' JSON vocabulary, on the caller's thread."""
        try:
            node = compile_format(params.guided) if isinstance(params.guided, dict) else params.guided
            with self._vocab_lock:
                if node is not None and self._json_vocab is None:
                    self._json_vocab = JsonVocab(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
        except GuidedError as exc:
            raise InvalidRequest(str(exc), "response_format") from None
        return node

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Output], None],
               bounded: bool = True, max_tokens: int | None = None) -> Request:
        """Queue a request; `sink` receives its outputs on the worker thread. `max_tokens` is
        what `check_prompt` returned, for a caller that checked already; None: checked here."""
        prompt = list(prompt)
        max_tokens, node = self._check(prompt, params) if max_tokens is None else (max_tokens, self._response_format(params))
        # The prompt's last ids as context: SentencePiece decoders then keep the first token's space.
        decoder = self.tokenizer.stream_decoder(prompt[-4:], skip_special_tokens=True)
        text = TextStream(decoder, params.stop, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        guide = None if node is None else Guide(node, self._json_vocab)  # one per request: it holds the row's state
        req = Request(next(self._ids), prompt, params, max_tokens, text, sink, guide)
        with self.scheduler.lock:
            if self._closing or self._thread is None:
                raise EngineClosed("the engine is not running")
            self.scheduler.admit(req, bounded)
            self.live.add(req)
            self.scheduler.lock.notify()
        return req

    def abort(self, req: Request) -> None:
        """Cancel a request from any thread; its slot is freed before the next step."""
        req.cancelled = True
        with self.scheduler.lock:
            self.scheduler.lock.notify()

    def submit_async(self, prompt: Sequence[int], params: SamplingParams, queue: asyncio.Queue, tag: Any = None,
                     bounded: bool = True, max_tokens: int | None = None) -> Request:
        """Queue a request whose outputs arrive as `(tag, output)` on an asyncio queue of the
        running loop; several requests may share one queue. The caller aborts the requests it
        stops listening to."""
        loop = asyncio.get_running_loop()
        return self.submit(prompt, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, (tag, out)),
                           bounded, max_tokens)

    def generate(self, prompts: Sequence[offline.Prompt], params: offline.Params = None,
                 progress: bool = True) -> list[Completion]:
        """Offline generation, from any thread but the worker's (a progress bar shows finished
        requests). Lists of messages go through the chat template (a final assistant message is
        continued), strings are encoded as they are, token ids are used as given. `params` is
        one `SamplingParams` for all prompts or one per prompt; None: the engine's defaults."""
        return offline.generate(self, prompts, params, progress)

    async def agenerate(self, prompts: Sequence[offline.Prompt], params: offline.Params = None) -> list[Completion]:
        """`generate` for async callers: waits without blocking the event loop."""
        return await offline.agenerate(self, prompts, params)

    # ------------------------------------------------------------------ the step loop (worker thread)

    def _set_up(self) -> None:
        # All tensor work happens on the worker thread, weight packing and the cache's first fill included:
        # once a thread has run an OpenMP region, libgomp runs another thread's markedly slower on few cores.
        if self.fast_path is not None:  # may leave the model inference-only: see fastpath.speed_up
            self.decode_logits = for_inference(self.model, **self.fast_path)
        if self.cache is None:
            self.cache = KVCache(self.model.config, self.max_batch_size, self.max_model_len, self.dtype, self.device)
        self.decode_logits.warm_up(self.cache)  # --compile: compiled here, not in a request's first step
        self.scheduler.cache = self.cache

    def _run(self, ready: list[BaseException | None]) -> None:
        error = None
        try:
            self._set_up()
        except BaseException as exc:  # handed to start(), which raises it on the caller's thread
            error = exc
        with self.scheduler.lock:
            ready.append(error)
            self.scheduler.lock.notify_all()
        if error is not None:
            return
        with torch.inference_mode():
            while self._wait_for_work():
                self.step += 1
                self.scheduler.drop_cancelled()
                self._prefill()
                if self.scheduler.running:
                    self._decode()
        _fail(self.scheduler.take_all(waiting=True), "the engine was shut down")

    def _wait_for_work(self) -> bool:
        """Move new requests to the waiting line; sleep while there is nothing to do."""
        s = self.scheduler
        with s.lock:
            while s.idle() and not self._closing:
                s.lock.wait()
            s.take_inbox()
            return not self._closing

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens, shared first come first served among the requests
        in the prefill slots, several in one forward. The last prompt token is left to the
        decode step (the first invariant above). Budget left after a forward goes to requests
        that were held back by a shared prefix and can now copy it."""
        s, budget = self.scheduler, self.prefill_chunk
        while budget > 0:
            for req in list(s.fill_prefill_slots()):
                if req.prefilled == len(req.prompt) - 1:  # nothing left to compute (a reused prefix)
                    s.start_running(req)
            work = []
            for req in s.prefilling:  # slots n, n + 1, ...: the rows given work are a prefix of them
                todo = min(len(req.prompt) - 1 - req.prefilled, budget)
                if todo <= 0:
                    break
                work.append((req, todo))
                budget -= todo
            if not work:
                return
            try:
                self._prefill_forward(work, len(s.running))
            except Exception as exc:  # these prompts failed; the running rows are untouched
                _fail(s.drop_prefilling([r for r, _ in work]), f"prefill failed: {type(exc).__name__}: {exc}")
                continue
            if self.trace is not None:
                n = len(s.running)
                for j, (req, todo) in enumerate(work):
                    self.trace(TraceRow(self.step, n + j, req.id, "prefill", todo))
            for req, todo in work:
                req.prefilled += todo
                if req.prefilled == len(req.prompt) - 1:
                    s.start_running(req)

    def _prefill_forward(self, work: list[tuple[Request, int]], first_slot: int) -> None:
        """Each request's next `todo` prompt tokens into its slot (first_slot + j), padded to the
        longest. Padding sits at positions after the row's real ones (clamped to the cache): its
        keys are written where this row has not been yet, and are overwritten before any query
        can attend to them."""
        width, last = max(todo for _, todo in work), self.max_model_len - 1
        ids, positions = [], []
        for req, todo in work:
            start = req.prefilled
            ids.append(req.prompt[start : start + todo] + [0] * (width - todo))
            positions.append([min(start + t, last) for t in range(width)])
        batch = torch.tensor([ids, positions]).to(self.device, non_blocking=True)
        span = max(row[-1] for row in positions) + 1
        self.model.hidden_states(batch[0], batch[1], self.cache.rows(first_slot, first_slot + len(work), span))

    def _decode(self) -> None:
        s = self.scheduler
        running = s.running  # packed in slots [0, n): the second invariant above
        if s.rows_changed:
            self.sampler.set_rows(running)
            s.rows_changed = False
        try:
            logits = self._decode_forward(running)
        except Exception as exc:  # the model itself failed: no row can be told apart
            _fail(s.take_all(waiting=False), f"{type(exc).__name__}: {exc}")
            return
        for i, req in enumerate(running if self.trace is not None else ()):
            self.trace(TraceRow(self.step, i, req.id, "decode", 1))
        try:
            sampled = self.sampler(logits)
        except Exception:  # some row's parameters broke the batched call: find it, keep the others
            sampled = self.sampler.sample_each_alone(logits)
            s.rows_changed = True  # rebuilt from the tokens appended below
        finished = []
        for i, req in enumerate(running):
            if i in sampled.failed:
                req.fail(sampled.failed[i])
                finished.append(i)
                continue
            self._append(req, sampled.tokens[i], sampled.logprobs[i], sampled.top_logprobs[i])
            if req.done or req.cancelled:
                finished.append(i)
        s.remove(finished)

    def _decode_forward(self, running: list[Request]) -> torch.Tensor:
        """The model's decode step, the one place the step loop calls it to decode: each running
        row feeds its last token at its own position. Returns `[n, vocab]` logits."""
        fed = torch.tensor([[r.tokens[-1], len(r.tokens) - 1] for r in running]).to(self.device, non_blocking=True)
        ids, positions = fed[:, :1].contiguous(), fed[:, 1:].contiguous()
        span = max(len(r.tokens) for r in running)  # known here: the step need not read it back
        return self.decode_logits(ids, positions, self.cache, span)

    def _append(self, req: Request, token: int, logprob: float | None, top: list | None) -> None:
        """Add a sampled token to its request and send the text it releases."""
        req.tokens.append(token)
        if self._is_stop_token(token, req.params):
            text, reason = req.text.flush(), "stop"
        else:
            if req.guide is not None:
                try:
                    req.guide.advance(token)
                except ValueError as exc:  # a token the mask allowed is always accepted: a defect
                    req.fail(f"constrained decoding failed: {exc}")
                    return
            text, hit = req.text.push(token)
            reason = "stop" if hit else None
        if reason is None and req.generated >= req.max_tokens:
            text, reason = text + req.text.flush(), "length"
        req.emit(Output([token], text, [logprob], [top], reason, req.prompt_len, req.generated))

    def _is_stop_token(self, token: int, params: SamplingParams) -> bool:
        return (not params.ignore_eos and token in self.eos_ids) or token in params.stop_token_ids


def _fail(reqs: list[Request], message: str) -> None:
    for r in reqs:
        r.fail(message)
