"""Each sampler processor against its transformers counterpart on random logits, row by row
with per-row parameters, and the batch sampler's draws, seeds and defaults."""
import pytest
import torch
from transformers.generation.logits_process import (
    ExponentialDecayLengthPenalty,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from eeyore.serve.params import SamplingParams, checkpoint_defaults, layered_defaults, parse_sequence_bias
from eeyore.serve.request import Request
from eeyore.serve.sampler import (
    Sampler,
    add_sequence_bias_,
    bias_table,
    decay_boost,
    decay_length_penalty_,
    draw,
    penalise_presence_frequency_,
    penalise_repetition_,
    truncate,
)

V = 64


def random_logits(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3


def test_sequence_bias_matches_transformers():
    torch.manual_seed(1)
    # one-token keys, two multi-token keys ending in the same token, a repeated key (the later wins)
    per_row = [
        [[[5], -4.0], [[7, 9], 2.5], [[3, 9], 1.0], [[5], 3.0]],
        [[[9], 1.5], [[1, 2, 3], -2.0], [[2, 3], 0.5]],
        [[[0], 10.0]],
        [[[8, 8], -1.0], [[8], 0.25]],
    ]
    histories = [[1, 2, 7], [4, 1, 2], [6], [8, 8]]
    logits = random_logits(4)
    ours = logits.clone()
    add_sequence_bias_(ours, [bias_table(parse_sequence_bias(b)) for b in per_row], histories)
    for r, (bias, hist) in enumerate(zip(per_row, histories)):
        theirs = SequenceBiasLogitsProcessor(bias)(torch.tensor([hist]), logits[r : r + 1])
        torch.testing.assert_close(ours[r : r + 1], theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(3, seed=2)
    histories = [[1, 5, 5, 9], [0, 63], [7]]
    seen = torch.zeros(3, V, dtype=torch.bool)
    for r, h in enumerate(histories):
        seen[r, h] = True
    penalties = torch.tensor([penalty, 1.0, 2.0])
    ours = logits.clone()
    penalise_repetition_(ours, seen, penalties)
    for r, h in enumerate(histories):
        theirs = RepetitionPenaltyLogitsProcessor(float(penalties[r]))(torch.tensor([h]), logits[r : r + 1].clone())
        torch.testing.assert_close(ours[r : r + 1], theirs, rtol=0, atol=0)


def test_presence_frequency_by_hand():
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[0.0, 1, 3, 0], [2, 0, 0, 0]])
    penalise_presence_frequency_(logits, counts, torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.0]))
    assert logits.tolist() == [[0.0, -0.75, -1.25, 0.0], [-1.0, 0.0, 0.0, 0.0]]


def test_length_decay_matches_transformers():
    eos = [2, 7, 11]
    logits = random_logits(4, seed=3)
    logits[0, 2], logits[1, 7], logits[2, 11] = -5.0, 4.0, float("-inf")
    # (start, factor, prompt length, generated): before start, at it, after it, long after it
    cases = [(0, 1.01, 5, 0), (3, 1.5, 4, 3), (0, 1.01, 6, 40), (2, 1.2, 3, 9)]
    boost = torch.tensor([decay_boost(SamplingParams(exponential_decay_length_penalty=(s, f)), k) for s, f, _, k in cases])
    ours = logits.clone()
    decay_length_penalty_(ours, torch.tensor(eos), boost)
    for r, (start, factor, prompt, k) in enumerate(cases):
        proc = ExponentialDecayLengthPenalty((start, factor), eos, prompt)
        theirs = proc(torch.zeros(1, prompt + k, dtype=torch.long), logits[r : r + 1])
        torch.testing.assert_close(ours[r : r + 1], theirs, rtol=0, atol=0)
    assert ours[2, 2] > logits[2, 2] and ours[2, 11] == float("-inf")


def transformers_warped(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    x = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(None, x)
    return x


ROWS = [  # temperature, top_k, top_p, min_p
    (1.0, 50, 1.0, 0.0),
    (0.7, 0, 0.8, 0.0),
    (1.3, 10, 0.5, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.5, 20, 0.9, 0.05),
    (2.0, 0, 0.999, 0.0),
    (1.0, 1, 1.0, 0.0),
    (1.0, 0, 0.0, 0.0),  # top_p 0 still keeps the most likely token
]


@pytest.mark.parametrize("with_full_vocab_row", [True, False])
def test_warpers_match_transformers(with_full_vocab_row):
    rows = ROWS if with_full_vocab_row else [r for r in ROWS if r[1]]  # all rows top-k: candidate path
    for seed in range(5):
        logits = random_logits(len(rows), seed=10 + seed)
        vals, ids = truncate(logits, torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                             torch.tensor([r[2] for r in rows], dtype=torch.float64), torch.tensor([r[3] for r in rows]))
        ours = torch.full_like(logits, float("-inf")).scatter(1, ids, vals)
        for r, (temp, k, p, m) in enumerate(rows):
            theirs = transformers_warped(logits[r : r + 1], temp, k, p, m)
            torch.testing.assert_close(ours[r : r + 1], theirs, rtol=0, atol=0)


BOUNDED_ROWS = [r for r in ROWS if r[1] or r[2] < 1.0 or r[3] > 0]  # every row's kept set is bounded


def test_rows_without_top_k_skip_the_full_sort_and_keep_transformers_set(monkeypatch):
    """With top-k off, top-p / min-p rows take a candidate prefix proven to hold their kept set
    (a large vocabulary and peaked scores, as a language model's): no sort, same kept set."""
    sorts = []
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(1) or torch.sort(self, *a, **k))
    for seed in range(5):
        logits = torch.randn(len(BOUNDED_ROWS), 5000, generator=torch.Generator().manual_seed(seed)) * 6
        temps = torch.tensor([r[0] for r in BOUNDED_ROWS])
        vals, ids = truncate(logits, temps, torch.tensor([r[1] for r in BOUNDED_ROWS]),
                             torch.tensor([r[2] for r in BOUNDED_ROWS], dtype=torch.float64),
                             torch.tensor([r[3] for r in BOUNDED_ROWS]))
        assert vals.shape[1] < 5000
        ours = torch.full_like(logits, float("-inf")).scatter(1, ids, vals)
        for r, (temp, k, p, m) in enumerate(BOUNDED_ROWS):
            theirs = transformers_warped(logits[r : r + 1], temp, k, p, m)
            torch.testing.assert_close(ours[r : r + 1], theirs, rtol=0, atol=0)
    assert not sorts
    flat = torch.zeros(1, 5000)  # nothing bounds a uniform row's top-p set short of the vocabulary
    vals, _ = truncate(flat, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.9], dtype=torch.float64), torch.zeros(1))
    assert vals.shape[1] == 5000 and sorts


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(40000, -1)
    vals, ids = truncate(logits, torch.ones(40000), torch.zeros(40000, dtype=torch.long), torch.ones(40000, dtype=torch.float64), torch.zeros(40000))
    picked = ids.gather(1, draw(vals, torch.rand(40000, generator=torch.Generator().manual_seed(0)))[:, None])[:, 0]
    freq = torch.bincount(picked, minlength=5).float() / 40000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert freq[4] == 0


def row(params: SamplingParams, tokens: list[int]) -> Request:
    """A request as the sampler sees it (its own generator when the params carry a seed)."""
    return Request(0, tokens, params, 1, None, None)


def run_rows(rows: list[Request], steps: int, logit_seed: int) -> list[list[int]]:
    """Sample `steps` tokens per row from random logits that depend only on the row's own tokens."""
    sampler = Sampler(V, eos_ids=[2], seed=123)
    sampler.set_rows(rows)
    out = [[] for _ in rows]
    for _ in range(steps):
        logits = torch.stack([random_logits(1, seed=logit_seed + sum(r.tokens))[0] for r in rows])
        for r, row, tok in zip(range(len(rows)), rows, sampler(logits).tokens):
            row.tokens.append(tok)
            out[r].append(tok)
    return out


def seeded_row(seed: int, **kw) -> Request:
    return row(SamplingParams(seed=seed, **kw), [1, 2, 3])


def test_seeded_rows_do_not_depend_on_the_batch():
    params = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2, sequence_bias=(((2,), -4.0),),
                  exponential_decay_length_penalty=(2, 1.1))
    alone = run_rows([seeded_row(7, **params)], 20, logit_seed=0)[0]
    others = [seeded_row(8, top_k=0), row(SamplingParams(temperature=0.0), [1, 2, 3]),
              row(SamplingParams(top_k=0, min_p=0.1, frequency_penalty=0.5), [4])]
    batched = run_rows(others[:2] + [seeded_row(7, **params)] + others[2:], 20, logit_seed=0)[2]
    assert alone == batched
    assert run_rows([seeded_row(9, **params)], 20, logit_seed=0)[0] != alone


def test_greedy_rows_take_the_processed_argmax():
    logits = random_logits(2, seed=4)
    top = int(logits[0].argmax())
    rows = [row(SamplingParams(temperature=0.0, sequence_bias=(((top,), -100.0),)), [5]),
            row(SamplingParams(temperature=0.0), [5])]
    sampler = Sampler(V, eos_ids=[2])
    sampler.set_rows(rows)
    tokens = sampler(logits).tokens
    masked = logits[0].clone()
    masked[top] -= 100
    assert tokens == [int(masked.argmax()), int(logits[1].argmax())]


def test_logprobs_are_the_raw_model_distribution():
    logits = random_logits(3, seed=5)
    rows = [row(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3), [1]),
            row(SamplingParams(temperature=0.0), [1]),
            row(SamplingParams(seed=3, logprobs=True), [1])]
    sampler = Sampler(V, eos_ids=[2])
    sampler.set_rows(rows)
    out = sampler(logits)
    lp = logits.log_softmax(-1)
    assert out.logprobs[0] == pytest.approx(float(lp[0].max()), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.logprobs[2] == pytest.approx(float(lp[2, out.tokens[2]]), abs=1e-6)
    assert [t for t, _ in out.top_logprobs[0]] == lp[0].topk(3).indices.tolist()
    assert out.top_logprobs[2] == []


def test_defaults_are_layered_in_rising_priority():
    ckpt = checkpoint_defaults({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100, "do_sample": True, "eos_token_id": 2})
    flags = {"top_p": 0.8, "sequence_bias": parse_sequence_bias("[[[128009], -4.0]]"), "temperature": None}
    p = layered_defaults(ckpt, flags)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.6, 50, 0.8, 100)
    assert p.sequence_bias == (((128009,), -4.0),)
    assert p.updated(top_k=0, temperature=None).top_k == 0


@pytest.mark.parametrize("bad", ["[[[1], 'x']]", "[[[-1], 1.0]]", "[[[], 1.0]]", "{", "[5]"])
def test_bad_sequence_bias_is_named(bad):
    with pytest.raises(ValueError, match="sequence_bias"):
        parse_sequence_bias(bad)
