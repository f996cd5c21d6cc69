"""Agreement between annotators: Cohen's kappa over the items both labelled."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float | None:
    """(p_o - p_e) / (1 - p_e) for two raters' labels of the same items; None when undefined
    (no items, or both raters used one and the same label throughout: chance explains it all)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} labels: the raters must label the same items")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def pairwise(labels: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """For each pair of annotators (annotator -> item -> label): shared items, raw agreement, kappa."""
    out = []
    for x, y in combinations(sorted(labels), 2):
        shared = sorted(set(labels[x]) & set(labels[y]))
        a, b = [labels[x][i] for i in shared], [labels[y][i] for i in shared]
        agree = sum(p == q for p, q in zip(a, b)) / len(shared) if shared else None
        out.append({"a": x, "b": y, "items": len(shared), "agreement": agree, "kappa": cohen_kappa(a, b)})
    return out
