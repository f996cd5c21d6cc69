"""Client profiles: schema, validation, system-prompt rendering and the traits to interview.

A profile record (the schema of `../shared/data/eeyore_test_profiles.json` and of our own
`eeyore/eval/data/sample_profiles.json`) is a JSON object with
  - `profile`: the 13 fields of FIELDS (two of them nested: symptom -> severity and
    distortion -> exhibited),
  - `cognitive profile` (optional, needed by the Patient-Psi baseline): COGNITIVE_FIELDS, with
    `cognitive_models` a list of {situation, automatic_thoughts, emotion, behavior},
  - `conversation` (optional): the messages the profile was extracted from, system first,
    `assistant` = the client, `user` = the supporter,
  - optional `source` / `id_source` used to name the profile in messages.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SYMPTOMS, DISTORTIONS = "symptom severity", "cognition distortion exhibition"
SEVERITY_FIELDS = ("depression severity", "suicidal ideation severity", "homicidal ideation severity")
# The order every rendering follows (it is the order of the stored system prompts).
FIELDS = (
    "name", "gender", "age", "marital status", "occupation", "situation of the client",
    "counseling history", "resistance toward the support", SYMPTOMS, DISTORTIONS, *SEVERITY_FIELDS,
)
COGNITIVE_FIELDS = (
    "life_history", "core_beliefs", "core_belief_description", "intermediate_beliefs",
    "intermediate_beliefs_during_depression", "coping_strategies", "cognitive_models",
)
COGNITIVE_MODEL_FIELDS = ("situation", "automatic_thoughts", "emotion", "behavior")
LEVELS = ("mild", "moderate", "severe")

HEADER = (
    "You will act as a help-seeker struggling with negative emotions in a conversation with "
    "someone who is listening to you.\nYOUR PROFILE:\n"
)
TASK = (
    "\nYOUR TASK:\nAs the client, your role is to continue the conversation by responding "
    "naturally to the supporter, reflecting the characteristics outlined in your profile."
)
# Some extraction runs numbered the labels ("3-Moderate", "2-Exhibited"); the number is noise.
_LABEL_PREFIX = re.compile(r"^\s*\d+\s*-\s*")


class ProfileError(ValueError):
    """A profile record does not follow the schema; the message names the record and field."""


@dataclass
class Trait:
    """One thing the interview checks: a symptom at a level, a distortion, or overall severity."""

    category: str  # "mild" | "moderate" | "severe" | "distortion" | "overall"
    name: str  # the symptom / distortion as written in the profile, or the severity text

    @property
    def key(self) -> str:
        return f"{self.category}:{self.name}"


@dataclass
class Profile:
    record: dict[str, Any]
    index: int  # position in its file
    label: str  # how messages name it, e.g. "profile 3 (Red_depression 206374)"
    fields: dict[str, Any] = field(init=False)
    cognitive: dict[str, Any] | None = field(init=False)
    conversation: list[dict[str, str]] | None = field(init=False)

    def __post_init__(self) -> None:
        self.fields = self.record["profile"]
        self.cognitive = self.record.get("cognitive profile")
        self.conversation = self.record.get("conversation")

    def symptom_levels(self) -> dict[str, str | None]:
        """symptom -> "mild" | "moderate" | "severe" | None (not exhibited)."""
        return {k: severity_level(v) for k, v in self.fields[SYMPTOMS].items()}

    def exhibited_distortions(self) -> list[str]:
        return [k for k, v in self.fields[DISTORTIONS].items() if not _has(v, "not exhibited")]

    def client_turns(self) -> list[str]:
        """The real client's turns of the source conversation (empty when there is none)."""
        return [m["content"] for m in self.conversation or [] if m["role"] == "assistant"]


def _has(value: str, phrase: str) -> bool:
    return phrase in value.lower()


def severity_level(value: str) -> str | None:
    """"Moderate", "3-Moderate" -> "moderate"; "Not exhibited" -> None."""
    label = _LABEL_PREFIX.sub("", value).strip().lower()
    if label == "not exhibited":
        return None
    if label not in LEVELS:
        raise ValueError(f"unknown severity {value!r} (expected Not exhibited, Mild, Moderate or Severe)")
    return label


def traits(profile: Profile) -> list[Trait]:
    """Every trait the interview asks about, in profile order: symptoms, distortions, overall."""
    out = [Trait(level, name) for name, level in profile.symptom_levels().items() if level]
    out += [Trait("distortion", name) for name in profile.exhibited_distortions()]
    overall = _eval_value(profile.fields["depression severity"])
    if overall:
        out.append(Trait("overall", overall))
    return out


# ---------------------------------------------------------------- rendering


def render_system_prompt(profile: Profile | dict[str, Any], style: str = "train") -> str:
    """The client's system prompt.

    style="train": the prompt the training data was made with (reproduces the stored prompts);
    values containing "cannot be identified" / "not exhibited" are left out.
    style="eval": the reference evaluation's variant: most values lowercased, symptoms grouped
    severe -> moderate -> mild, and "N/A" / "unknown" / "not specified" values left out too.
    """
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
        return not (_has(value, "cannot be identified") or _has(value, "not exhibited"))

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


def _eval_value(value: str) -> str:
    """The reference evaluation dropped unknown values: "" means "leave the line out"."""
    low = value.strip().lower()
    if low in ("", "n/a", "unknown", "not specified"):
        return ""
    if any(p in low for p in ("cannot be identified", "cannot be determined", "not mention", "not exhibited")):
        return ""
    return value


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
            entries = [f"  - {k.lower()}: exhibited" for k, v in value.items() if not _has(v, "not exhibited")]
        else:
            value = _eval_value(value)
            if value:
                lines.append(f"- {name}: {value if name in keep_case else value.lower()}")
            continue
        if entries:
            lines += [f"- {name}", *entries]
    return lines


# ---------------------------------------------------------------- loading and validation


def sample_profiles_path() -> Path:
    """The sample profiles shipped with the package (written for this project)."""
    return Path(str(resources.files("eeyore.eval") / "data" / "sample_profiles.json"))


def load_profiles(path: str | Path | None = None) -> list[Profile]:
    """Read and validate a profiles file (a JSON list of records); None -> the sample profiles."""
    path = Path(path) if path is not None else sample_profiles_path()
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"profiles file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise ProfileError(f"{path}: expected a non-empty JSON list of profile records")
    return [validate_profile(r, i, where=str(path)) for i, r in enumerate(records)]


def validate_profile(record: Any, index: int = 0, where: str = "<profiles>") -> Profile:
    """Check one record against the schema; raise ProfileError naming the record and field."""
    label = f"profile {index}"
    names = [str(record[k]) for k in ("source", "id_source") if isinstance(record, dict) and record.get(k) is not None]
    if names:
        label += f" ({' '.join(names)})"

    def fail(msg: str) -> None:
        raise ProfileError(f"{where}: {label}: {msg}")

    if not isinstance(record, dict):
        fail(f"expected an object, got {type(record).__name__}")
    fields = record.get("profile")
    if not isinstance(fields, dict):
        fail("missing 'profile' object")
    for name in fields:
        if name not in FIELDS:
            fail(f"unknown field 'profile.{name}' (expected one of: {', '.join(FIELDS)})")
    for name in FIELDS:
        if name not in fields:
            fail(f"missing field 'profile.{name}'")
        value = fields[name]
        if name in (SYMPTOMS, DISTORTIONS):
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                fail(f"field 'profile.{name}' must be an object of strings")
        elif not isinstance(value, str):
            fail(f"field 'profile.{name}' must be a string, got {type(value).__name__}")
    for symptom, value in fields[SYMPTOMS].items():
        try:
            severity_level(value)
        except ValueError as e:
            fail(f"field 'profile.{SYMPTOMS}.{symptom}': {e}")
    for distortion, value in fields[DISTORTIONS].items():
        if _LABEL_PREFIX.sub("", value).strip().lower() not in ("exhibited", "not exhibited"):
            fail(f"field 'profile.{DISTORTIONS}.{distortion}': expected Exhibited or Not exhibited, got {value!r}")
    _validate_cognitive(record.get("cognitive profile"), fail)
    _validate_conversation(record.get("conversation"), fail)
    return Profile(record, index, label)


def _validate_cognitive(cog: Any, fail) -> None:
    if cog is None:
        return
    if not isinstance(cog, dict):
        fail("'cognitive profile' must be an object")
    for name in COGNITIVE_FIELDS:
        if name not in cog:
            fail(f"missing field 'cognitive profile.{name}'")
        if name != "cognitive_models" and not isinstance(cog[name], str):
            fail(f"field 'cognitive profile.{name}' must be a string")
    models = cog["cognitive_models"]
    if not isinstance(models, list) or not models:
        fail("field 'cognitive profile.cognitive_models' must be a non-empty list")
    for j, model in enumerate(models):
        for name in COGNITIVE_MODEL_FIELDS:
            if not isinstance(model, dict) or not isinstance(model.get(name), str):
                fail(f"field 'cognitive profile.cognitive_models[{j}].{name}' must be a string")


def _validate_conversation(conv: Any, fail) -> None:
    if conv is None:
        return
    if not isinstance(conv, list):
        fail("'conversation' must be a list of messages")
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            fail(f"'conversation[{j}]' must have role system, user or assistant")
        if not isinstance(msg.get("content"), str):
            fail(f"'conversation[{j}].content' must be a string")
