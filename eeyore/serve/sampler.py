"""Choosing the next token for a batch of rows, each with its own parameters.

One call per decode step works on the whole `[B, V]` fp32 logits with per-row parameter
tensors, in transformers' order: sequence bias, repetition penalty, (OpenAI presence/frequency
penalties), exponential decay length penalty; greedy rows take the argmax there; sampling rows
go on through temperature, top-k, top-p and min-p. Each processor is a function that matches
its transformers counterpart; the tests hold them to it.

Truncation runs on candidates: `topk` with the largest k in the batch (a full sort only when a
row has top-k off), which is far cheaper than transformers' full sort of the vocabulary and
gives the same kept set. A draw is one uniform number per row from that row's own generator
(inverse CDF over its candidates), so a seeded request draws the same tokens whatever else is
in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import SamplingParams, SequenceBias

NEG_INF = float("-inf")


@dataclass
class Row:
    """What the sampler reads about one running sequence; the engine appends each new token."""

    params: SamplingParams
    tokens: list[int]  # prompt + generated
    prompt_len: int
    generator: torch.Generator | None = None  # None: the sampler's shared generator


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # raw-model log-probability of each chosen token (rows that asked)
    top_logprobs: list[list[tuple[int, float]] | None]


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
        where, slot = torch.tensor(flat).unique(return_inverse=True)
        total = torch.zeros(len(where), dtype=logits.dtype).index_add_(0, slot, torch.tensor(vals, dtype=logits.dtype))
        logits.view(-1).index_add_(0, where, total)


def penalise_repetition_(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place: transformers' penalty on every token of prompt + output (divide a positive logit,
    multiply a negative one)."""
    p = penalty[:, None].expand_as(logits)[seen]
    x = logits[seen]
    logits[seen] = torch.where(x < 0, x * p, x / p)


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
    """factor^(k - start) - 1 in double precision, as transformers computes it, for k generated tokens."""
    decay = params.exponential_decay_length_penalty
    if decay is None or generated <= decay[0]:
        return 0.0
    return pow(decay[1], generated - decay[0]) - 1


def truncate(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, top-p and min-p.

    Returns candidate logits sorted in descending order, removed ones at -inf, and their token
    ids. `top_k` is 0 where off, `top_p` 1.0 and `min_p` 0.0 where off. Dividing by a positive
    temperature keeps the order, so only the candidates are divided, with the same result.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    widest = int(k.max())
    if widest < vocab:
        vals, ids = logits.topk(widest, dim=-1)
    else:
        vals, ids = logits.sort(dim=-1, descending=True)
    vals = vals / temperature[:, None]
    kth = vals.gather(1, (k.clamp(max=widest) - 1)[:, None])
    vals = vals.masked_fill(vals < kth, NEG_INF)
    use_p = top_p < 1.0
    if bool(use_p.any()):
        # transformers sums the probabilities from the least likely up and drops a token while
        # that mass is <= 1 - top_p: the token that crosses top_p is kept.
        rising = vals.flip(-1).softmax(-1).cumsum(-1)
        drop = (rising <= (1 - top_p.double()).float()[:, None]).flip(-1)
        drop[:, 0] = False
        vals = vals.masked_fill(drop & use_p[:, None], NEG_INF)
    if bool((min_p > 0).any()):
        probs = vals.softmax(-1)
        drop = probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        vals = vals.masked_fill(drop, NEG_INF)
    return vals, ids


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

    def __init__(self, vocab_size: int, eos_ids: list[int], seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self.rng = torch.Generator()
        self.rng.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self.set_rows([])

    def set_rows(self, rows: list[Row]) -> None:
        self.rows = rows
        ps = [r.params for r in rows]
        self.greedy = torch.tensor([p.greedy for p in ps], dtype=torch.bool)
        self.all_greedy = all(p.greedy for p in ps)
        self.all_sampling = not any(p.greedy for p in ps)
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in ps], dtype=torch.float32)
        self.top_k = torch.tensor([max(p.top_k, 0) for p in ps], dtype=torch.long)
        self.top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float64)
        self.min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32)
        self.tables = [bias_table(p.sequence_bias) for p in ps]
        self.any_bias = any(self.tables)
        self.any_decay = any(p.exponential_decay_length_penalty is not None for p in ps) and len(self.eos_ids) > 0
        self.logprob_rows = [i for i, p in enumerate(ps) if p.logprobs]
        self._set_penalties(ps)

    def _set_penalties(self, ps: list[SamplingParams]) -> None:
        self.any_repetition = any(p.repetition_penalty != 1.0 for p in ps)
        self.any_additive = any(p.presence_penalty or p.frequency_penalty for p in ps)
        if not (self.any_repetition or self.any_additive):
            return
        b = len(ps)
        self.repetition = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32)
        self.presence = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32)
        self.frequency = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32)
        self.seen = torch.zeros(b, self.vocab_size, dtype=torch.bool)
        self.counts = torch.zeros(b, self.vocab_size, dtype=torch.float32)
        for i, row in enumerate(self.rows):
            self.seen[i, torch.tensor(row.tokens, dtype=torch.long)] = True
            out = torch.tensor(row.tokens[row.prompt_len:], dtype=torch.long)
            self.counts[i].index_add_(0, out, torch.ones(len(out)))

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor) -> Sampled:
        """Pick one token per row from `[B, V]` logits, which it may overwrite."""
        x = logits.float()
        # log-probabilities are of the model's own distribution, before any processor
        lp = x[torch.tensor(self.logprob_rows)].log_softmax(-1) if self.logprob_rows else None
        if self.any_bias:
            add_sequence_bias_(x, self.tables, [r.tokens for r in self.rows])
        if self.any_repetition:
            penalise_repetition_(x, self.seen, self.repetition)
        if self.any_additive:
            penalise_presence_frequency_(x, self.counts, self.presence, self.frequency)
        if self.any_decay:
            boost = torch.tensor([decay_boost(r.params, len(r.tokens) - r.prompt_len) for r in self.rows], dtype=torch.float32)
            decay_length_penalty_(x, self.eos_ids, boost)
        if self.all_sampling:
            tokens = self._draw(x)
        elif self.all_greedy:
            tokens = x.argmax(-1)
        else:
            tokens = torch.where(self.greedy, x.argmax(-1), self._draw(x))
        if self.any_repetition or self.any_additive:
            rows = torch.arange(len(self.rows))
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1
        return self._result(lp, tokens)

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        vals, ids = truncate(x, self.temperature, self.top_k, self.top_p, self.min_p)
        return ids.gather(1, draw(vals, self._uniforms())[:, None])[:, 0]

    def _uniforms(self) -> torch.Tensor:
        u = torch.rand(len(self.rows), generator=self.rng)
        for i, row in enumerate(self.rows):
            if row.generator is not None:
                u[i] = torch.rand((), generator=row.generator)
        return u

    def _result(self, lp: torch.Tensor | None, tokens: torch.Tensor) -> Sampled:
        chosen = tokens.tolist()
        logprobs: list[float | None] = [None] * len(chosen)
        tops: list[list[tuple[int, float]] | None] = [None] * len(chosen)
        if lp is not None:
            picked = lp.gather(1, tokens[self.logprob_rows, None])[:, 0].tolist()
            n_top = max(self.rows[i].params.top_logprobs for i in self.logprob_rows)
            top_vals, top_ids = lp.topk(max(n_top, 1), dim=-1)
            for j, i in enumerate(self.logprob_rows):
                logprobs[i] = picked[j]
                n = self.rows[i].params.top_logprobs
                tops[i] = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
        return Sampled(chosen, logprobs, tops)
