"""Several training datasets as one: `--dataset a,b [--dataset_probs 0.7,0.3]`.

Without probabilities the datasets are concatenated in the order given. With them, rows are
interleaved as `datasets.interleave_datasets(..., stopping_strategy="all_exhausted")` does
(what OpenRLHF uses): each next row comes from a dataset drawn with the given probabilities by a
generator seeded with `--seed` (so every rank builds the same list), a dataset that has run out
starts again from its first row, and the mixture ends once every dataset with a non-zero
probability has been used up at least once. The mixture is then cut to `max_samples`.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from .data import Row, load_rows

T = TypeVar("T")


def interleave(sources: Sequence[Sequence[T]], probs: Sequence[float], seed: int) -> list[T]:
    weights = np.array([p if len(s) else 0.0 for s, p in zip(sources, probs)], dtype=np.float64)
    if weights.sum() <= 0:
        return []
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    taken = [0] * len(sources)
    pending = {i for i, w in enumerate(weights) if w > 0}  # not yet used up once
    out: list[T] = []
    while pending:
        i = int(rng.choice(len(sources), p=weights))
        out.append(sources[i][taken[i] % len(sources[i])])
        taken[i] += 1
        if taken[i] == len(sources[i]):
            pending.discard(i)
    return out


def load_mixture(specs: str, probs: str | None, split: str, max_samples: int, seed: int) -> list[Row]:
    """The rows of every comma-separated dataset in `specs`, mixed as the module doc says."""
    sources = [load_rows(spec.strip(), split, max_samples) for spec in specs.split(",")]
    if probs is None:
        rows = [row for source in sources for row in source]
    else:
        rows = interleave(sources, [float(p) for p in probs.split(",")], seed)
    return rows[:max_samples]
