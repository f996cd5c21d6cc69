"""Choosing the next token for a batch of rows, each with its own parameters.

One call per decode step works on the whole `[B, V]` fp32 logits with per-row parameter
tensors, in transformers' order: sequence bias, repetition penalty, (OpenAI presence/frequency
penalties), exponential decay length penalty; greedy rows take the argmax there; sampling rows
go on through temperature, top-k, top-p and min-p. Each processor is a function that matches
its transformers counterpart; the tests hold them to it.

Truncation runs on candidates: `topk` with the largest k in the batch, which is far cheaper than
transformers' full sort of the vocabulary and gives the same kept set. A row with top-k off
needs no sort either when top-p or min-p bounds its kept set: on the CPU the candidates are the
smallest power-of-8 prefix that provably holds it (a full sort of 16 rows x 49k scores costs
more than a 135M model's decode step on two cores). The kept set is then transformers' except
where the kept mass lies within float rounding (1e-5) of top-p, where the full sort is used. A draw is one uniform number per row from that row's own generator
(inverse CDF over its candidates), so a seeded request draws the same tokens whatever else is
in the batch.

The rows are the engine's `Request`s: the sampler reads their `params`, `tokens` (prompt +
generated), `prompt_len` and `generator`. Everything runs on the logits' device; the step's one
synchronisation is reading the chosen tokens back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .params import SamplingParams, SequenceBias

if TYPE_CHECKING:
    from .request import Request

NEG_INF = float("-inf")
WIDTHS = (64, 512, 4096)  # candidate counts tried for rows with top-k off, before a full sort
ROUNDING = 1e-5  # kept mass this close to top-p is left to the full sort
MAX_DECAY_BOOST = 1e30  # factor^k overflows a double for long outputs; |eos logit| * 1e30 is still finite in fp32


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # raw-model log-probability of each chosen token (rows that asked)
    top_logprobs: list[list[tuple[int, float]] | None]
    failed: dict[int, str] = field(default_factory=dict)  # row -> why no token could be chosen


# ----------------------------------------------------------------------------- processors


def bias_table(sequence_bias: SequenceBias) -> dict[tuple[int, ...], float]:
    """transformers keeps one bias per key: a repeated key overrides the earlier one."""
    return {tuple(ids): float(bias) for ids, bias in sequence_bias}


def add_sequence_bias_(logits: torch.Tensor, tables: list[dict[tuple[int, ...], float]], histories: list[list[int]]) -> None:
    """In place. A one-token key biases its token every step; a longer key biases its last token
    when the history ends with the rest of the key. Biases landing on one token are summed
    first, as transformers does, then added once."""
    flat, vals = [], []
    vocab = logits.shape[-1]
    for r, (table, history) in enumerate(zip(tables, histories)):
        for key, bias in table.items():
            n = len(key) - 1
            if n == 0 or (len(history) >= n and tuple(history[-n:]) == key[:-1]):
                flat.append(r * vocab + key[-1])
                vals.append(bias)
    if flat:
        where, slot = torch.tensor(flat, device=logits.device).unique(return_inverse=True)
        total = torch.zeros(len(where), dtype=logits.dtype, device=logits.device).index_add_(
            0, slot, torch.tensor(vals, dtype=logits.dtype, device=logits.device))
        logits.view(-1).index_add_(0, where, total)


def allow_guided_(logits: torch.Tensor, rows: list[int], allowed: list) -> None:
    """In place: -inf for every token the rows' response_format does not allow next; each
    row's allowed tokens are a boolean mask over the vocabulary or a list of token ids."""
    keep = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool)
    for j, a in enumerate(allowed):
        keep[j, a] = True  # a mask row, or the listed ids
    logits[rows] = logits[rows].masked_fill(~keep.to(logits.device, non_blocking=True), NEG_INF)


def penalise_repetition_(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place: transformers' penalty on every token of prompt + output (divide a positive logit,
    multiply a negative one). Dense rather than indexed by `seen`: boolean indexing would read
    the number of seen tokens back from the device every step."""
    p = penalty[:, None]
    logits.copy_(torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits))


def penalise_presence_frequency_(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> None:
    """In place: OpenAI's additive penalties over the generated tokens' counts."""
    logits.sub_(counts * frequency[:, None] + (counts > 0).to(logits.dtype) * presence[:, None])


def decay_length_penalty_(logits: torch.Tensor, eos_ids: torch.Tensor, boost: torch.Tensor) -> None:
    """In place. Exponential decay length penalty: each eos logit x gets |x| * boost, with
    boost = factor^(k-start) - 1 (0 for rows not yet past their start), so a negative eos logit
    rises toward and past zero."""
    eos = logits[:, eos_ids]
    penalty = (eos.abs() * boost[:, None]).masked_fill(~torch.isfinite(eos), 0.0)
    logits[:, eos_ids] = eos + penalty


def decay_boost(params: SamplingParams, generated: int) -> float:
    """factor^(k - start) - 1 in double precision, as transformers computes it, for k generated
    tokens; capped at MAX_DECAY_BOOST where transformers would overflow."""
    decay = params.exponential_decay_length_penalty
    if decay is None or generated <= decay[0]:
        return 0.0
    start, factor = decay
    if (generated - start) * math.log(factor) > math.log(MAX_DECAY_BOOST):
        return MAX_DECAY_BOOST
    return pow(factor, generated - start) - 1


def truncate(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             min_p: torch.Tensor, widest: int | None = None, any_top_p: bool | None = None,
             any_min_p: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, top-p and min-p.

    Returns candidate logits sorted in descending order, removed ones at -inf, and their token
    ids. `top_k` is 0 where off, `top_p` 1.0 and `min_p` 0.0 where off. Dividing by a positive
    temperature keeps the order, so only the candidates are divided, with the same result.
    `widest` (the largest k) and whether any row uses top-p / min-p may be given by a caller
    that knows them, to save reading them back from the device.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    widest = int(k.max()) if widest is None else widest
    vals, ids, outside = _candidates(logits, temperature, k, widest, top_p, min_p)
    kth = vals.gather(1, (k.clamp(max=vals.shape[-1]) - 1)[:, None])
    vals = vals.masked_fill(vals < kth, NEG_INF)
    use_p = top_p < 1.0
    if bool(use_p.any()) if any_top_p is None else any_top_p:
        # transformers sums the probabilities from the least likely up and drops a token while
        # that mass is <= 1 - top_p: the token that crosses top_p is kept.
        if outside is None:
            rising = vals.flip(-1).softmax(-1).cumsum(-1)
        else:  # the least likely tokens are not candidates: their mass starts the sum
            rising = outside[:, None] + vals.flip(-1).softmax(-1).mul(1 - outside[:, None]).cumsum(-1)
        drop = (rising <= (1 - top_p.double()).float()[:, None]).flip(-1)
        drop[:, 0] = False
        vals = vals.masked_fill(drop & use_p[:, None], NEG_INF)
    if bool((min_p > 0).any()) if any_min_p is None else any_min_p:
        probs = vals.softmax(-1)
        drop = probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        vals = vals.masked_fill(drop, NEG_INF)
    return vals, ids


def _candidates(logits: torch.Tensor, temperature: torch.Tensor, k: torch.Tensor, widest: int,
                top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Temperature-scaled candidate scores in descending order, their ids, and for rows with
    top-k off the probability mass left out of the candidates (None when nothing is left out
    that a row could keep)."""
    vocab = logits.shape[-1]
    if widest >= vocab and logits.device.type == "cpu":
        full = k >= vocab
        scaled = logits / temperature[:, None]
        log_total = scaled.logsumexp(-1, keepdim=True)
        bounded = _bounded_width(scaled, log_total, full, top_p, min_p)
        if bounded < vocab:
            vals, ids = scaled.topk(max(bounded, int(k.masked_fill(full, 0).max())), dim=-1)
            outside = torch.where(full, 1 - (vals - log_total).exp().sum(-1), 0.0).clamp(0, 1)
            return vals, ids, outside
    vals, ids = logits.topk(widest, dim=-1) if widest < vocab else logits.sort(dim=-1, descending=True)
    return vals / temperature[:, None], ids, None


def _bounded_width(scaled: torch.Tensor, log_total: torch.Tensor, full: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> int:
    """The fewest candidates (from WIDTHS) certain to hold the kept set of every row with top-k
    off (`full`), or the vocabulary size when none is certain.

    Top-p keeps the most likely tokens until their mass reaches top_p, so a prefix whose mass
    reaches it (by a rounding margin) holds them all; min-p keeps tokens at least min_p times as
    likely as the first, so a prefix ending below that ratio holds them. A row with neither keeps
    everything. `scaled` are the temperature-scaled scores, `log_total` their log-sum-exp.
    """
    vocab = scaled.shape[-1]
    for width in WIDTHS:
        if width >= vocab:
            break
        probs = (scaled.topk(width, dim=-1).values - log_total).exp()
        by_p = probs.sum(-1) >= top_p + ROUNDING
        by_min_p = (min_p > 0) & (probs[:, -1] * (1 + ROUNDING) < min_p * probs[:, 0])
        if bool((~full | by_p | by_min_p).all()):
            return width
    return vocab


def draw(vals: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row over descending candidates. Unnormalised weights and a sequential
    cumulative sum keep a row's draw independent of how many candidates the batch carries."""
    weights = (vals - vals[:, :1]).exp()
    cdf = weights.cumsum(-1)
    target = uniforms[:, None] * cdf[:, -1:]
    last_kept = torch.isfinite(vals).sum(-1) - 1  # kept candidates are a prefix
    return torch.minimum((cdf <= target).sum(-1), last_kept)


# ----------------------------------------------------------------------------- the batch


class Sampler:
    """Holds the per-row parameter tensors of the running batch; rebuilt when rows join or leave."""

    def __init__(self, vocab_size: int, eos_ids: list[int], seed: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.rng = torch.Generator()  # on the CPU: draws are made there and moved, see _uniforms
        self.rng.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self.set_rows([])

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def set_rows(self, rows: list["Request"]) -> None:
        self.rows = rows
        ps = [r.params for r in rows]
        self.greedy = self._tensor([p.greedy for p in ps], torch.bool)
        self.all_greedy = all(p.greedy for p in ps)
        self.all_sampling = not any(p.greedy for p in ps)
        self.temperature = self._tensor([1.0 if p.greedy else p.temperature for p in ps], torch.float32)
        # a greedy row's draw is discarded (it takes the argmax): one candidate is all it needs
        self.top_k = self._tensor([1 if p.greedy else max(p.top_k, 0) for p in ps], torch.long)
        self.widest_k = self._widest_k(ps)
        self.top_p = self._tensor([p.top_p for p in ps], torch.float64)
        self.any_top_p = any(p.top_p < 1.0 for p in ps)
        self.min_p = self._tensor([p.min_p for p in ps], torch.float32)
        self.any_min_p = any(p.min_p > 0 for p in ps)
        self.tables = [bias_table(p.sequence_bias) for p in ps]
        self.any_bias = any(self.tables)
        self.any_decay = any(p.exponential_decay_length_penalty is not None for p in ps) and len(self.eos_ids) > 0
        self.logprob_rows = [i for i, p in enumerate(ps) if p.logprobs]
        self.guided_rows = [i for i, r in enumerate(rows) if getattr(r, "guide", None) is not None]
        self._set_penalties(ps)

    def _widest_k(self, ps: list[SamplingParams]) -> int:
        """The most candidates any row keeps (the vocabulary when a row has top-k off), known on
        the host so that truncation needs no read-back."""
        ks = [1 if p.greedy else min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size for p in ps]
        return max(ks, default=self.vocab_size)

    def _set_penalties(self, ps: list[SamplingParams]) -> None:
        self.any_repetition = any(p.repetition_penalty != 1.0 for p in ps)
        self.any_additive = any(p.presence_penalty or p.frequency_penalty for p in ps)
        if not (self.any_repetition or self.any_additive):
            return
        b = len(ps)
        self.repetition = self._tensor([p.repetition_penalty for p in ps], torch.float32)
        self.presence = self._tensor([p.presence_penalty for p in ps], torch.float32)
        self.frequency = self._tensor([p.frequency_penalty for p in ps], torch.float32)
        self.seen = torch.zeros(b, self.vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=self.device)
        for i, row in enumerate(self.rows):
            self.seen[i, self._tensor(row.tokens, torch.long)] = True
            out = self._tensor(row.tokens[row.prompt_len:], torch.long)
            self.counts[i].index_add_(0, out, torch.ones(len(out), device=self.device))

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor) -> Sampled:
        """Pick one token per row from `[B, V]` logits (left as they are). A row whose scores
        hold a NaN gets no token: it is listed in `failed`, and the others are unaffected."""
        x = logits.to(torch.float32, copy=True)
        # log-probabilities are of the model's own distribution, before any processor
        lp = x[self.logprob_rows].log_softmax(-1) if self.logprob_rows else None
        if self.guided_rows:  # response_format first, so every processor works on the allowed tokens
            allow_guided_(x, self.guided_rows, [self.rows[i].guide.allowed() for i in self.guided_rows])
        if self.any_bias:
            add_sequence_bias_(x, self.tables, [r.tokens for r in self.rows])
        if self.any_repetition:
            penalise_repetition_(x, self.seen, self.repetition)
        if self.any_additive:
            penalise_presence_frequency_(x, self.counts, self.presence, self.frequency)
        if self.any_decay:
            boost = self._tensor([decay_boost(r.params, len(r.tokens) - r.prompt_len) for r in self.rows], torch.float32)
            decay_length_penalty_(x, self.eos_ids, boost)
        nan_rows = x.isnan().any(-1)
        if self.all_sampling:
            tokens = self._draw(x)
        elif self.all_greedy:
            tokens = x.argmax(-1)
        else:
            tokens = torch.where(self.greedy, x.argmax(-1), self._draw(x))
        # NaN scores, or a draw over no finite candidate (a NaN temperature), choose no token
        broken = nan_rows | (tokens < 0) | (tokens >= x.shape[-1])
        tokens = tokens.clamp(0, x.shape[-1] - 1)
        if self.any_repetition or self.any_additive:
            rows = torch.arange(len(self.rows), device=self.device)
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1
        return self._result(lp, tokens, broken)

    def sample_each_alone(self, logits: torch.Tensor) -> Sampled:
        """After a batched call raised: every row on its own, so only the rows that fail are lost.
        Rare, so plain and slow; the batch's tensors are rebuilt afterwards."""
        rows, out = self.rows, Sampled([], [], [])
        for i, row in enumerate(rows):
            try:
                self.set_rows([row])
                one = self(logits[i : i + 1])
                token, lp, top = one.tokens[0], one.logprobs[0], one.top_logprobs[0]
                if one.failed:
                    out.failed[i] = one.failed[0]
            except Exception as exc:
                token, lp, top = -1, None, None
                out.failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
            out.tokens.append(token)
            out.logprobs.append(lp)
            out.top_logprobs.append(top)
        self.set_rows(rows)
        return out

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        vals, ids = truncate(x, self.temperature, self.top_k, self.top_p, self.min_p,
                             self.widest_k, self.any_top_p, self.any_min_p)
        return ids.gather(1, draw(vals, self._uniforms())[:, None])[:, 0]

    def _uniforms(self) -> torch.Tensor:
        u = torch.rand(len(self.rows), generator=self.rng)
        for i, row in enumerate(self.rows):
            if row.generator is not None:
                u[i] = torch.rand((), generator=row.generator)
        return u.to(self.device, non_blocking=True)

    def _result(self, lp: torch.Tensor | None, tokens: torch.Tensor, broken: torch.Tensor) -> Sampled:
        n_top = max((self.rows[i].params.top_logprobs for i in self.logprob_rows), default=0)
        if lp is not None:  # copied back with the tokens: still one synchronisation
            picked = lp.gather(1, tokens[self.logprob_rows, None])[:, 0]
            top_vals, top_ids = lp.topk(max(n_top, 1), dim=-1)
            chosen, bad, picked, top_vals, top_ids = [t.tolist() for t in _to_host(tokens, broken, picked, top_vals, top_ids)]
        else:
            chosen, bad = [t.tolist() for t in _to_host(tokens, broken)]
        logprobs: list[float | None] = [None] * len(chosen)
        tops: list[list[tuple[int, float]] | None] = [None] * len(chosen)
        for j, i in enumerate(self.logprob_rows):
            logprobs[i] = picked[j]
            n = self.rows[i].params.top_logprobs
            tops[i] = list(zip(top_ids[j][:n], top_vals[j][:n]))
        failed = {i: "no token could be chosen: the scores are not numbers (NaN)" for i, b in enumerate(bad) if b}
        return Sampled(chosen, logprobs, tops, failed)


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Bring tensors to the host with one synchronisation (a no-op on the CPU)."""
    if tensors[0].device.type == "cpu":
        return list(tensors)
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host
