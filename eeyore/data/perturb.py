"""Noise-injected profiles: the source of round-1 rejected replies.

The paper's round-1 preference pairs contrast the real client reply (chosen) with a reply
generated under a *perturbed* profile (rejected), so DPO rewards replies that follow the given
profile over fluent replies that follow a different one. The generation code was never
released; this file is our definition of the perturbation. Every change is recorded as
`{"field": ..., "from": ..., "to": ...}` so a preference row says exactly how its rejected side
was produced.

Three kinds of change, each applied a configurable number of times:
- severities moved *across the middle* of the scale (none/mild <-> moderate/severe), for
  symptoms, the overall depression severity and the resistance toward the support, so the
  perturbed profile contradicts the real one instead of nudging it;
- one exhibited cognitive distortion swapped with one that is not exhibited;
- demographic details (gender, age, marital status, occupation) replaced.

Values keep the profile's own spelling: the reference data writes severities either plainly
("Moderate") or with a rank prefix ("3-Moderate"), and a moved value uses the same style.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

from eeyore.profile import (
    DEPRESSION, DEPRESSION_LEVELS, DISTORTION_LEVELS, DISTORTIONS, RESISTANCE, RESISTANCE_LEVELS, SYMPTOM_LEVELS,
    SYMPTOMS, read_level,
)

# Replacement values for the demographic fields (the perturbation's own choice, not the schema's:
# a real profile may hold any text there).
DEMOGRAPHICS: dict[str, tuple[str, ...]] = {
    "gender": ("Female", "Male", "Non-binary"),
    "age": ("0~24", "25~44", "45~64", "65 or older"),
    "marital status": ("Single", "Married", "Divorced", "Widowed", "In a long-term relationship"),
    "occupation": ("Student", "Unemployed", "Nurse", "Software engineer", "Retail worker",
                   "Teacher", "Retired", "Construction worker"),
}


@dataclass
class PerturbConfig:
    symptoms: int = 3  # symptom severities moved
    distortion_swaps: int = 1  # exhibited <-> not-exhibited distortion swaps
    demographics: int = 1  # demographic fields replaced
    move_depression: bool = True  # move the overall depression severity as well
    move_resistance: bool = False  # resistance changes behaviour, not the condition: off by default


def _format_level(index: int, ranked: bool, levels: tuple[str, ...], suffix: str = "") -> str:
    label = levels[index] + suffix
    return f"{index + 1}-{label}" if ranked else label


def _across_middle(index: int, n_levels: int, rng: random.Random) -> int:
    """A level on the other half of the scale, so the change contradicts the original."""
    low = list(range(n_levels // 2))
    high = list(range(n_levels // 2, n_levels))
    return rng.choice(high if index in low else low)


def _move(profile: dict, path: tuple[str, ...], levels: tuple[str, ...], rng: random.Random,
          suffix: str = "") -> dict | None:
    parent = profile
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    parsed = read_level(old, levels)
    if parsed is None:
        return None
    index, ranked = parsed
    # the free-text explanation after the level ("... lacks symptoms of severe depression")
    # would contradict the new level, so a moved value is the bare level
    new = _format_level(_across_middle(index, len(levels), rng), ranked, levels, suffix)
    parent[path[-1]] = new
    return {"field": "/".join(path), "from": old, "to": new}


def _swap_distortions(profile: dict, rng: random.Random, done: set[str]) -> list[dict]:
    """Swap one exhibited and one unexhibited distortion not swapped before (`done`)."""
    table = profile.get(DISTORTIONS)
    if not isinstance(table, dict):
        return []
    levels = {k: read_level(v, DISTORTION_LEVELS) for k, v in table.items() if k not in done}
    on = [k for k, level in levels.items() if level is not None and level[0] == 1]
    off = [k for k, level in levels.items() if level is not None and level[0] == 0]
    if not on or not off:
        return []
    a, b = rng.choice(on), rng.choice(off)
    done.update((a, b))
    table[a], table[b] = table[b], table[a]
    return [
        {"field": f"{DISTORTIONS}/{a}", "from": table[b], "to": table[a]},
        {"field": f"{DISTORTIONS}/{b}", "from": table[a], "to": table[b]},
    ]


def _replace_demographic(profile: dict, field: str, rng: random.Random) -> dict:
    old = profile.get(field)
    choices = [v for v in DEMOGRAPHICS[field] if str(old).strip().lower() != v.lower()]
    profile[field] = rng.choice(choices)
    return {"field": field, "from": old, "to": profile[field]}


def perturb_profile(profile: dict, rng: random.Random, config: PerturbConfig | None = None
                    ) -> tuple[dict, list[dict]]:
    """A changed copy of `profile` (the fields of a profile record) and the list of changes made.

    Fields a profile lacks or whose values cannot be read as a level are left alone; the change
    list may therefore be shorter than the configuration asks for, but it is never empty for a
    profile that has any symptom, distortion pair or demographic field.
    """
    config = config or PerturbConfig()
    out = copy.deepcopy(profile)
    changes: list[dict] = []

    symptoms = out.get(SYMPTOMS) if isinstance(out.get(SYMPTOMS), dict) else {}
    movable = [k for k, v in symptoms.items() if read_level(v, SYMPTOM_LEVELS) is not None]
    for key in rng.sample(movable, min(config.symptoms, len(movable))):
        changes.append(_move(out, (SYMPTOMS, key), SYMPTOM_LEVELS, rng))

    if config.move_depression and DEPRESSION in out:
        changes.append(_move(out, (DEPRESSION,), DEPRESSION_LEVELS, rng, suffix=" Depression"))
    if config.move_resistance and RESISTANCE in out:
        changes.append(_move(out, (RESISTANCE,), RESISTANCE_LEVELS, rng))

    swapped: set[str] = set()
    for _ in range(config.distortion_swaps):
        changes.extend(_swap_distortions(out, rng, swapped))

    fields = [f for f in DEMOGRAPHICS if f in out]
    for field in rng.sample(fields, min(config.demographics, len(fields))):
        changes.append(_replace_demographic(out, field, rng))

    return out, [c for c in changes if c is not None]
