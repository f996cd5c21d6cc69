"""The profile schema: field names, the labels each field takes, and the traits a profile has.

A profile record (the schema of the shared test profiles and of `sample_profiles.json`) is a JSON
object with
  - `profile`: the 13 fields of FIELDS; two are nested: SYMPTOMS maps each of SYMPTOM_NAMES to a
    severity (SYMPTOM_LEVELS) and DISTORTIONS maps each of DISTORTION_NAMES to DISTORTION_LEVELS,
  - `cognitive profile` (optional, needed by the Patient-Psi baseline): COGNITIVE_FIELDS, with
    `cognitive_models` a list of {situation, automatic_thoughts, emotion, behavior},
  - `conversation` (optional): the messages the profile was extracted from, system first,
    `assistant` = the client, `user` = the supporter,
  - `evidence` (optional, written by profile extraction): field path -> quote from the conversation,
  - optional `source` / `id_source` used to name the profile in messages.

Labels may carry a rank prefix ("3-Moderate", "2-Exhibited"): some extraction runs numbered them.
The rank is noise to every reader here; `read_level` strips it and says whether it was there,
so a tool that writes a new value can keep the profile's own spelling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SYMPTOMS, DISTORTIONS = "symptom severity", "cognition distortion exhibition"
DEPRESSION, SUICIDAL, HOMICIDAL = "depression severity", "suicidal ideation severity", "homicidal ideation severity"
SEVERITY_FIELDS = (DEPRESSION, SUICIDAL, HOMICIDAL)
RESISTANCE = "resistance toward the support"
DEMOGRAPHIC_FIELDS = ("name", "gender", "age", "marital status", "occupation")
# The order every rendering follows (it is the order of the stored system prompts).
FIELDS = (
    *DEMOGRAPHIC_FIELDS, "situation of the client", "counseling history", RESISTANCE,
    SYMPTOMS, DISTORTIONS, *SEVERITY_FIELDS,
)
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
COGNITIVE_FIELDS = (
    "life_history", "core_beliefs", "core_belief_description", "intermediate_beliefs",
    "intermediate_beliefs_during_depression", "coping_strategies", "cognitive_models",
)
COGNITIVE_MODEL_FIELDS = ("situation", "automatic_thoughts", "emotion", "behavior")

# The ordered scales, lowest first. Free-text fields start with their level ("Mild Depression -
# the client ...", "No suicidal ideation"), so a value is read by the label it starts with.
SYMPTOM_LEVELS = ("Not exhibited", "Mild", "Moderate", "Severe")
DISTORTION_LEVELS = ("Not exhibited", "Exhibited")
DEPRESSION_LEVELS = ("Minimal", "Mild", "Moderate", "Severe")
IDEATION_LEVELS = ("No", "Mild", "Moderate", "Severe")
RESISTANCE_LEVELS = ("Low", "Medium", "High")
LEVEL_SCALES: dict[str, tuple[str, ...]] = {
    DEPRESSION: DEPRESSION_LEVELS, SUICIDAL: IDEATION_LEVELS, HOMICIDAL: IDEATION_LEVELS,
    RESISTANCE: RESISTANCE_LEVELS,
}
LEVELS = tuple(level.lower() for level in SYMPTOM_LEVELS[1:])  # the trait classes: mild, moderate, severe
UNKNOWN = "Cannot be identified"  # what a field the conversation says nothing about holds

_RANKED = re.compile(r"^\s*(\d+)\s*-\s*(.*)$", re.S)


class ProfileError(ValueError):
    """A profile record does not follow the schema; the message names the record and each field.

    `errors` lists the broken fields one per entry (the message joins them)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or [message]


def read_level(value: Any, levels: tuple[str, ...]) -> tuple[int, bool] | None:
    """(index in `levels`, had a rank prefix) for "Mild", "2-Mild", "Mild Depression. ..."; None
    when `value` starts with none of the labels."""
    if not isinstance(value, str):
        return None
    ranked = _RANKED.match(value)
    text = (ranked.group(2) if ranked else value).strip().lower()
    # longest label first, so "Not exhibited" is not read as a prefix of something shorter
    for index in sorted(range(len(levels)), key=lambda i: -len(levels[i])):
        if text.startswith(levels[index].lower()):
            return index, ranked is not None
    return None


def bare_label(value: str) -> str:
    """The label without its rank prefix, lowercased: "3-Moderate" -> "moderate"."""
    ranked = _RANKED.match(value)
    return (ranked.group(2) if ranked else value).strip().lower()


def severity_level(value: str) -> str | None:
    """A symptom's severity: "Moderate", "3-Moderate" -> "moderate"; "Not exhibited" -> None."""
    label = bare_label(value)
    if label == "not exhibited":
        return None
    if label not in LEVELS:
        raise ValueError(f"unknown severity {value!r} (expected Not exhibited, Mild, Moderate or Severe)")
    return label


def is_exhibited(value: str) -> bool:
    """A distortion's label: "Exhibited" / "2-Exhibited" -> True."""
    return "not exhibited" not in value.lower()


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
    """A validated record (see `validate_profile`) and the name messages call it by."""

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
        return [k for k, v in self.fields[DISTORTIONS].items() if is_exhibited(v)]

    def client_turns(self) -> list[str]:
        """The real client's turns of the source conversation (empty when there is none)."""
        return [m["content"] for m in self.conversation or [] if m["role"] == "assistant"]


def known_value(value: str) -> str:
    """"" when a free-text value says nothing ("N/A", "Cannot be identified", ...), else the value.
    The reference evaluation left such values out of its prompts and trait plan."""
    low = value.strip().lower()
    if low in ("", "n/a", "unknown", "not specified"):
        return ""
    if any(p in low for p in ("cannot be identified", "cannot be determined", "not mention", "not exhibited")):
        return ""
    return value


def traits(profile: Profile) -> list[Trait]:
    """Every trait the interview asks about, in profile order: symptoms, distortions, overall."""
    out = [Trait(level, name) for name, level in profile.symptom_levels().items() if level]
    out += [Trait("distortion", name) for name in profile.exhibited_distortions()]
    overall = known_value(profile.fields[DEPRESSION])
    if overall:
        out.append(Trait("overall", overall))
    return out


# What each free-text field holds: the descriptions of `json_schema` (what a model filling in a
# profile reads) and of any form that edits one.
FIELD_NOTES: dict[str, str] = {
    "name": f"the client's name, or {UNKNOWN!r}",
    "gender": f"Female, Male, Non-binary, or {UNKNOWN!r}",
    "age": f"0~24, 25~44, 45~64, 65 or older, or {UNKNOWN!r}",
    "marital status": f"e.g. Single, Married, Divorced, Widowed, In a long-term relationship, or {UNKNOWN!r}",
    "occupation": f"e.g. Student, Nurse, Unemployed, or {UNKNOWN!r}",
    "situation of the client": "two or three sentences on what brings the client here, in the third person",
    "counseling history": "earlier counselling or therapy, or N/A",
    RESISTANCE: "Low, Medium or High",
    DEPRESSION: "Minimal, Mild, Moderate or Severe Depression, then ' - ' and one sentence of reasons",
    SUICIDAL: "No suicidal ideation, or Mild, Moderate or Severe suicidal ideation",
    HOMICIDAL: "No homicidal ideation, or Mild, Moderate or Severe homicidal ideation",
}


def json_schema(evidence: bool = True) -> dict[str, Any]:
    """The JSON Schema of {"profile": ..., "evidence": ...}: every field required in `profile`,
    the nested labels as enums; `evidence` mirrors `profile` with quotes and is optional per field."""
    def table(names: tuple[str, ...], value: dict) -> dict:
        return {"type": "object", "properties": {n: value for n in names}, "required": list(names),
                "additionalProperties": False}

    nested = {SYMPTOMS: (SYMPTOM_NAMES, SYMPTOM_LEVELS), DISTORTIONS: (DISTORTION_NAMES, DISTORTION_LEVELS)}
    fields = {
        name: table(nested[name][0], {"type": "string", "enum": list(nested[name][1])}) if name in nested
        else {"type": "string", "description": FIELD_NOTES[name]}
        for name in FIELDS
    }
    profile = {"type": "object", "properties": fields, "required": list(FIELDS), "additionalProperties": False}
    schema: dict[str, Any] = {"type": "object", "properties": {"profile": profile}, "required": ["profile"],
                              "additionalProperties": False}
    if evidence:
        quote = {"type": "string", "description": "a short verbatim quote from the conversation"}
        quotes = {name: {**table(nested[name][0], quote), "required": []} if name in nested else quote
                  for name in FIELDS}
        schema["properties"]["evidence"] = {"type": "object", "properties": quotes, "additionalProperties": False}
    return schema
