"""Which request is in which KV-cache slot: admission, the waiting line, and prefix reuse.

No model call happens here; the engine's step loop (`engine.py`) asks the scheduler what to run.
Invariant, relied on by the decode step: the running requests sit packed in slots [0, n), slot i
holding `running[i]`, so one decode forward covers `cache.rows(0, n)`. The requests being
prefilled sit right after them, `prefilling[j]` in slot n + j, so one prefill forward covers
several of them. A leaver's slot is refilled by moving the last running row into it, and the
prefilling rows move down behind (`remove`); a prefilled request joins the running rows from
slot n (`start_running`).

Free slots keep the keys and values of the request that left them until they are overwritten
(`retired`: slot -> the tokens whose entries are there), so a conversation's next turn, which
resends the whole history, prefills only what is new (`reuse_prefix`).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from eeyore.model import KVCache

from .request import EngineFull, Request

MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a copy


class Scheduler:
    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots, self.max_queue = slots, max_queue
        self.cache: KVCache | None = None  # set by the engine's worker once allocated
        self.lock = threading.Condition()  # guards inbox, admitted, queued; wakes the worker
        self.inbox: deque[Request] = deque()  # submitted, not yet seen by the worker
        self.admitted = 0  # submitted and not yet finished: bounded by slots + max_queue
        self.queued = 0  # submitted and not yet prefilling
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []
        self.retired: dict[int, list[int]] = {}
        self.rows_changed = True  # the sampler's per-row tensors need rebuilding
        self.reused_prefix_tokens = 0  # prompt tokens taken from the cache instead of computed

    # ---------------------------------------------------------------- any thread (hold `lock`)

    def admit(self, req: Request, bounded: bool) -> None:
        """A burst of `slots + max_queue` requests is admitted whole: the slots count as room
        even before the worker has moved anyone into them."""
        if bounded and self.admitted >= self.slots + self.max_queue:
            raise EngineFull(f"{self.admitted} requests are already running or waiting "
                             f"(the bound is {self.slots} slots + a queue of {self.max_queue})")
        self.admitted += 1
        self.queued += 1
        self.inbox.append(req)

    # ---------------------------------------------------------------- the worker thread

    def idle(self) -> bool:
        return not (self.inbox or self.waiting or self.running or self.prefilling)

    def take_inbox(self) -> None:
        self.waiting.extend(self.inbox)
        self.inbox.clear()

    def finished(self, reqs: Sequence[Request]) -> None:
        """These requests have left (done, cancelled or failed): their room is free again."""
        with self.lock:
            self.admitted -= len(reqs)

    def drop_cancelled(self) -> None:
        gone = [r for r in self.waiting if r.cancelled]
        if gone:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
            with self.lock:
                self.queued -= len(gone)
        self.finished(gone)
        self.remove([i for i, r in enumerate(self.running) if r.cancelled])
        self.drop_prefilling([r for r in self.prefilling if r.cancelled])

    def fill_prefill_slots(self) -> list[Request]:
        """Move waiting requests into the free slots after the running rows, reusing any cached
        prefix of theirs. A request that shares a prefix with one still being prefilled waits
        for it, so that the shared part is computed once (the n choices of one prompt, the
        system prompt of one profile)."""
        while self.waiting and len(self.running) + len(self.prefilling) < self.slots:
            req = self.waiting[0]
            if any(_shared_prefix_length(p.prompt, req.prompt, MIN_SHARED_PREFIX) >= MIN_SHARED_PREFIX
                   for p in self.prefilling):
                break
            self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            self.reuse_prefix(req, len(self.running) + len(self.prefilling))
            self.prefilling.append(req)
        return self.prefilling

    def start_running(self, req: Request) -> None:
        """This request's prompt is in the cache but for its last token: from now on the decode
        step feeds that token and every later one. It joins the running rows at slot n."""
        j, n = self.prefilling.index(req), len(self.running)
        if j:  # bring it to slot n: the first prefilling row takes its place
            first = self.prefilling[0]
            self.cache.swap_slots(n, n + j, first.prefilled, req.prefilled)
            self.prefilling[0], self.prefilling[j] = req, first
        self.prefilling.pop(0)
        self.running.append(req)
        self.rows_changed = True

    def remove(self, indices: list[int]) -> None:
        """Free the slots of these running rows, keeping the others packed in [0, n) and the
        prefilling rows right after them."""
        if not indices:
            return
        running = self.running
        before = len(running)
        self.finished([running[i] for i in indices])
        for i in sorted(indices, reverse=True):  # later leavers first: the last row is never one
            last = len(running) - 1
            cached = running[i].cached
            if i != last:  # swap slots, so the leaver's entries stay in the cache at `last`
                self.cache.swap_slots(i, last, len(cached), len(running[last].cached))
                running[i] = running[last]
            self.retired[last] = cached
            running.pop()
        self._move_prefilling(before)
        self.rows_changed = True

    def drop_prefilling(self, reqs: list[Request]) -> list[Request]:
        """Take these requests out of prefilling (cancelled, or their prefill failed)."""
        if not reqs:
            return reqs
        n = len(self.running)
        self.finished(reqs)
        old_slots = {id(r): n + j for j, r in enumerate(self.prefilling)}
        kept = [r for r in self.prefilling if r not in reqs]
        self.prefilling = kept
        for j, r in enumerate(kept):  # in rising order: a destination is never a later source
            if old_slots[id(r)] != n + j and r.prefilled:
                self.cache.copy_slot(old_slots[id(r)], n + j, r.prefilled)
        return reqs

    def _move_prefilling(self, start: int) -> None:
        """The prefilling rows sat from slot `start`; move them down behind the running rows."""
        n = len(self.running)
        for j, r in enumerate(self.prefilling):  # in rising order: a destination is never a later source
            if start != n and r.prefilled:
                self.copy_slot(start + j, n + j, r.prefilled)
            self.retired.pop(n + j, None)

    def reuse_prefix(self, req: Request, slot: int) -> None:
        """Take the cached keys and values of the longest prompt prefix shared with a running row
        or a retired slot instead of computing them again (attention is causal: the same tokens
        give the same entries). A profile's system prompt, the prompt of n > 1 choices, or the
        history a conversation's next turn resends, is prefilled once."""
        limit, best, src = len(req.prompt) - 1, 0, -1
        cached = [(i, other.cached) for i, other in enumerate(self.running)]
        for i, tokens in [*cached, *self.retired.items()]:
            k = _shared_prefix_length(tokens, req.prompt, limit)
            if k > best or (k == best and i == slot):  # ties: the slot itself needs no copy
                best, src = k, i
        if best >= MIN_SHARED_PREFIX and src != slot:
            self.copy_slot(src, slot, best)
        self.retired.pop(slot, None)  # the new request writes here from now on
        if best >= MIN_SHARED_PREFIX:
            req.prefilled = best
            self.reused_prefix_tokens += best

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.retired.pop(dst, None)  # whatever was kept in dst is overwritten
        self.cache.copy_slot(src, dst, length)

    def take_all(self, waiting: bool) -> list[Request]:
        """Every request in the cache (and, with `waiting`, in line) leaves: a step failed for
        all of them, or the engine stops."""
        reqs = self.running + self.prefilling
        if waiting:
            with self.lock:
                reqs += list(self.waiting) + list(self.inbox)
                self.waiting.clear()
                self.inbox.clear()
                self.queued = 0
        self.finished(reqs)
        self.running, self.prefilling, self.rows_changed = [], [], True
        self.retired.clear()  # a failed step may have left any slot half-written
        return reqs


def _shared_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k
