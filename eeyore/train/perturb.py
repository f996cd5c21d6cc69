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
import re
from dataclasses import dataclass
from typing import Any

from eeyore.eval.profiles import FIELDS, HEADER, TASK

SYMPTOMS = "symptom severity"
DISTORTIONS = "cognition distortion exhibition"
DEPRESSION = "depression severity"
RESISTANCE = "resistance toward the support"

SYMPTOM_LEVELS = ("Not exhibited", "Mild", "Moderate", "Severe")
DEPRESSION_LEVELS = ("Minimal", "Mild", "Moderate", "Severe")
RESISTANCE_LEVELS = ("Low", "Medium", "High")
DISTORTION_LEVELS = ("Not exhibited", "Exhibited")

DEMOGRAPHICS: dict[str, tuple[str, ...]] = {
    "gender": ("Female", "Male", "Non-binary"),
    "age": ("0~24", "25~44", "45~64", "65 or older"),
    "marital status": ("Single", "Married", "Divorced", "Widowed", "In a long-term relationship"),
    "occupation": ("Student", "Unemployed", "Nurse", "Software engineer", "Retail worker",
                   "Teacher", "Retired", "Construction worker"),
}

# The schema's nested keys (DESIGN §8), needed to fill in what a rendered prompt leaves out.
SYMPTOM_NAMES = (
    "feelings of sadness, tearfulness, emptiness, or hopelessness",
    "angry outbursts, irritability, or frustration, even over small matters",
    "loss of interest or pleasure in most or all normal activities, such as sex, hobbies, or sports",
    "sleep disturbances, including insomnia or sleeping too much",
    "tiredness and lack of energy, so even small tasks take extra effort",
    "changes in appetite and weight (reduced appetite and weight loss or increased cravings for food and weight gain)",
    "anxiety, agitation, or restlessness",
    "slowed thinking, speaking, or body movements",
    "feelings of worthlessness or guilt, fixating on past failures or self-blame",
    "trouble thinking, concentrating, making decisions, and remembering things",
    "frequent or recurrent thoughts of death, suicidal thoughts, suicide attempts, or suicide",
    "unexplained physical problems, such as back pain or headaches",
    "becoming withdrawn, negative, or detached",
    "increased engagement in high-risk activities",
    "greater impulsivity",
    "increased use of alcohol or drugs",
    "isolating from family and friends",
    "inability to meet the responsibilities of work and family or ignoring other important roles",
)
DISTORTION_NAMES = (
    "selective abstraction", "overgeneralizing", "personalization",
    "catastrophic thinking", "minimisation", "arbitrary inference",
)

_RANKED = re.compile(r"^\s*(\d+)\s*-\s*(.*)$", re.S)


@dataclass
class PerturbConfig:
    symptoms: int = 3  # symptom severities moved
    distortion_swaps: int = 1  # exhibited <-> not-exhibited distortion swaps
    demographics: int = 1  # demographic fields replaced
    move_depression: bool = True  # move the overall depression severity as well
    move_resistance: bool = False  # resistance changes behaviour, not the condition: off by default


def _parse_level(value: Any, levels: tuple[str, ...]) -> tuple[int, bool] | None:
    """(index in `levels`, had a rank prefix) for values like "Mild", "2-Mild", "Mild Depression. ..."."""
    if not isinstance(value, str):
        return None
    ranked = _RANKED.match(value)
    text = (ranked.group(2) if ranked else value).strip().lower()
    # longest label first, so "Not exhibited" is not read as a prefix of something shorter
    for index in sorted(range(len(levels)), key=lambda i: -len(levels[i])):
        if text.startswith(levels[index].lower()):
            return index, ranked is not None
    return None


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
    parsed = _parse_level(old, levels)
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
    levels = {k: _parse_level(v, DISTORTION_LEVELS) for k, v in table.items() if k not in done}
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
    """A changed copy of `profile` (DESIGN §8 schema) and the list of changes made.

    Fields a profile lacks or whose values cannot be read as a level are left alone; the change
    list may therefore be shorter than the configuration asks for, but it is never empty for a
    profile that has any symptom, distortion pair or demographic field.
    """
    config = config or PerturbConfig()
    out = copy.deepcopy(profile)
    changes: list[dict] = []

    symptoms = out.get(SYMPTOMS) if isinstance(out.get(SYMPTOMS), dict) else {}
    movable = [k for k, v in symptoms.items() if _parse_level(v, SYMPTOM_LEVELS) is not None]
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


def profile_from_system_prompt(prompt: str) -> dict[str, Any]:
    """The profile behind a training-style system prompt (the inverse of
    `eeyore.eval.render_system_prompt(profile, style="train")`).

    The rendering leaves out unknown and unexhibited values, so they come back as
    "Cannot be identified" and "Not exhibited": rendering the result gives `prompt` again.
    """
    if not (prompt.startswith(HEADER) and prompt.endswith(TASK)):
        raise ValueError("not a training-style profile prompt (it must start with the help-seeker header "
                         "and end with the YOUR TASK paragraph)")
    profile: dict[str, Any] = {name: "Cannot be identified" for name in FIELDS}
    profile[SYMPTOMS] = {name: "Not exhibited" for name in SYMPTOM_NAMES}
    profile[DISTORTIONS] = {name: "Not exhibited" for name in DISTORTION_NAMES}
    nested: dict | None = None
    for line in prompt[len(HEADER):-len(TASK)].rstrip("\n").split("\n"):
        if line.startswith("  - ") and nested is not None:
            key, _, value = line[4:].partition(": ")
            nested[key] = value
        elif line[2:] in (SYMPTOMS, DISTORTIONS) and line.startswith("- "):
            nested = profile[line[2:]]
        elif line.startswith("- ") and line[2:].partition(": ")[0] in FIELDS:
            name, _, value = line[2:].partition(": ")
            profile[name], nested = value, None
        else:
            raise ValueError(f"cannot read profile line {line!r}")
    return profile
