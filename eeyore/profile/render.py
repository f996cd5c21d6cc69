"""A profile as the client's system prompt, and a training-style prompt read back into a profile.

Two styles:
  - "train": the prompt the training data was made with. It reproduces the stored system prompts
    of the reference conversations byte for byte, so it is what every training record and every
    served client uses. Values containing "cannot be identified" / "not exhibited" are left out.
  - "eval": the reference evaluation's variant: most values lowercased, symptoms grouped
    severe -> moderate -> mild, and "N/A" / "unknown" / "not specified" values left out too.
`parse_system_prompt` inverts the train style: what the rendering left out comes back as
"Cannot be identified" / "Not exhibited", so rendering the result gives the prompt again.
"""
from __future__ import annotations

from typing import Any

from .schema import (
    DISTORTION_NAMES, DISTORTIONS, FIELDS, LEVELS, SEVERITY_FIELDS, SYMPTOM_NAMES, SYMPTOMS, UNKNOWN, Profile,
    is_exhibited, known_value, severity_level,
)

HEADER = (
    "You will act as a help-seeker struggling with negative emotions in a conversation with "
    "someone who is listening to you.\nYOUR PROFILE:\n"
)
TASK = (
    "\nYOUR TASK:\nAs the client, your role is to continue the conversation by responding "
    "naturally to the supporter, reflecting the characteristics outlined in your profile."
)
STYLES = ("train", "eval")


def render_system_prompt(profile: Profile | dict[str, Any], style: str = "train") -> str:
    """The client's system prompt for a Profile, a record ({"profile": ...}) or a bare fields dict."""
    fields = profile.fields if isinstance(profile, Profile) else profile.get("profile", profile)
    if style == "train":
        lines = _train_lines(fields)
    elif style == "eval":
        lines = _eval_lines(fields)
    else:
        raise ValueError(f"unknown prompt style {style!r} (expected 'train' or 'eval')")
    return HEADER + "".join(line + "\n" for line in lines) + TASK


def profile_lines(profile: Profile, style: str = "eval") -> str:
    """Just the profile lines (the persona the Roleplay-doh critique and Patient-Psi show)."""
    prompt = render_system_prompt(profile, style)
    return prompt[len(HEADER):-len(TASK)].strip("\n")


def _train_lines(fields: dict[str, Any]) -> list[str]:
    def kept(value: str) -> bool:
        low = value.lower()
        return "cannot be identified" not in low and "not exhibited" not in low

    lines = []
    for name in FIELDS:
        value = fields[name]
        if isinstance(value, dict):
            entries = [f"  - {k}: {v}" for k, v in value.items() if kept(v)]
            if entries:
                lines += [f"- {name}", *entries]
        elif kept(value):
            lines.append(f"- {name}: {value}")
    return lines


def _eval_lines(fields: dict[str, Any]) -> list[str]:
    # The reference lowercased every free-text value except counseling history and the three
    # severity fields, and printed normalised labels for the nested fields.
    keep_case = {"counseling history", *SEVERITY_FIELDS}
    lines = []
    for name in FIELDS:
        value = fields[name]
        if name == SYMPTOMS:
            levels = {k: severity_level(v) for k, v in value.items()}
            entries = [f"  - {k.lower()}: {lvl}" for lvl in reversed(LEVELS) for k, v in levels.items() if v == lvl]
        elif name == DISTORTIONS:
            entries = [f"  - {k.lower()}: exhibited" for k, v in value.items() if is_exhibited(v)]
        else:
            value = known_value(value)
            if value:
                lines.append(f"- {name}: {value if name in keep_case else value.lower()}")
            continue
        if entries:
            lines += [f"- {name}", *entries]
    return lines


def parse_system_prompt(prompt: str) -> dict[str, Any]:
    """The profile fields behind a training-style system prompt (the inverse of
    `render_system_prompt(fields, "train")`); ValueError naming the line it cannot read."""
    if not (prompt.startswith(HEADER) and prompt.endswith(TASK)):
        raise ValueError("not a training-style profile prompt (it must start with the help-seeker header "
                         "and end with the YOUR TASK paragraph)")
    profile: dict[str, Any] = {name: UNKNOWN for name in FIELDS}
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
