"""Validation and loading of profile records.

`profile_errors(record)` lists every broken field, one entry each, naming it by its path
('profile.symptom severity.greater impulsivity'); `validate_profile` raises them as one
ProfileError. Tools that must report rather than stop (profile extraction retries a model with
its errors quoted back) use the list.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .schema import (
    COGNITIVE_FIELDS, COGNITIVE_MODEL_FIELDS, DISTORTION_NAMES, DISTORTIONS, FIELDS, SYMPTOM_NAMES, SYMPTOMS,
    Profile, ProfileError, bare_label, severity_level,
)


def sample_profiles_path() -> Path:
    """The sample profiles shipped with the package (written for this project)."""
    return Path(str(resources.files("eeyore.profile") / "sample_profiles.json"))


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


def profile_label(record: Any, index: int) -> str:
    """How messages name a record: "profile 3 (Red_depression 206374)"."""
    label = f"profile {index}"
    names = [str(record[k]) for k in ("source", "id_source") if isinstance(record, dict) and record.get(k) is not None]
    return label + (f" ({' '.join(names)})" if names else "")


def validate_profile(record: Any, index: int = 0, where: str = "<profiles>") -> Profile:
    """Check one record against the schema; raise ProfileError naming the record and each broken field."""
    errors = profile_errors(record)
    if errors:
        label = profile_label(record, index)
        raise ProfileError(f"{where}: {label}: " + "; ".join(errors), errors)
    return Profile(record, index, profile_label(record, index))


def profile_errors(record: Any) -> list[str]:
    """Every way `record` breaks the schema, one entry per broken field; [] when it is valid."""
    if not isinstance(record, dict):
        return [f"expected an object, got {type(record).__name__}"]
    fields = record.get("profile")
    if not isinstance(fields, dict):
        return ["missing 'profile' object"]
    errors = [f"unknown field 'profile.{name}' (expected one of: {', '.join(FIELDS)})" for name in fields if name not in FIELDS]
    for name in FIELDS:
        if name not in fields:
            errors.append(f"missing field 'profile.{name}'")
        elif name == SYMPTOMS:
            errors += _table_errors(fields[name], name, SYMPTOM_NAMES, _symptom_error)
        elif name == DISTORTIONS:
            errors += _table_errors(fields[name], name, DISTORTION_NAMES, _distortion_error)
        elif not isinstance(fields[name], str):
            errors.append(f"field 'profile.{name}' must be a string, got {type(fields[name]).__name__}")
    errors += _cognitive_errors(record.get("cognitive profile"))
    errors += _conversation_errors(record.get("conversation"))
    errors += _evidence_errors(record.get("evidence"))
    return errors


def _table_errors(table: Any, name: str, keys: tuple[str, ...], check) -> list[str]:
    """A nested field: an object with exactly `keys`, each value a label `check` accepts."""
    if not isinstance(table, dict):
        return [f"field 'profile.{name}' must be an object of strings"]
    errors = [f"unknown entry 'profile.{name}.{k}'" for k in table if k not in keys]
    for key in keys:
        if key not in table:
            errors.append(f"missing entry 'profile.{name}.{key}'")
        elif not isinstance(table[key], str):
            errors.append(f"field 'profile.{name}.{key}' must be a string")
        elif (problem := check(table[key])):
            errors.append(f"field 'profile.{name}.{key}': {problem}")
    return errors


def _symptom_error(value: str) -> str:
    try:
        severity_level(value)
    except ValueError as e:
        return str(e)
    return ""


def _distortion_error(value: str) -> str:
    if bare_label(value) in ("exhibited", "not exhibited"):
        return ""
    return f"expected Exhibited or Not exhibited, got {value!r}"


def _cognitive_errors(cog: Any) -> list[str]:
    if cog is None:
        return []
    if not isinstance(cog, dict):
        return ["'cognitive profile' must be an object"]
    errors = []
    for name in COGNITIVE_FIELDS:
        if name not in cog:
            errors.append(f"missing field 'cognitive profile.{name}'")
        elif name != "cognitive_models" and not isinstance(cog[name], str):
            errors.append(f"field 'cognitive profile.{name}' must be a string")
    models = cog.get("cognitive_models")
    if "cognitive_models" in cog and (not isinstance(models, list) or not models):
        return errors + ["field 'cognitive profile.cognitive_models' must be a non-empty list"]
    for j, model in enumerate(models or []):
        for name in COGNITIVE_MODEL_FIELDS:
            if not isinstance(model, dict) or not isinstance(model.get(name), str):
                errors.append(f"field 'cognitive profile.cognitive_models[{j}].{name}' must be a string")
    return errors


def _conversation_errors(conv: Any) -> list[str]:
    if conv is None:
        return []
    if not isinstance(conv, list):
        return ["'conversation' must be a list of messages"]
    errors = []
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            errors.append(f"'conversation[{j}]' must have role system, user or assistant")
        elif not isinstance(msg.get("content"), str):
            errors.append(f"'conversation[{j}].content' must be a string")
    return errors


def _evidence_errors(evidence: Any) -> list[str]:
    """`evidence` mirrors `profile`: the same field names, a quote where the profile has a label."""
    if evidence is None:
        return []
    if not isinstance(evidence, dict):
        return ["'evidence' must be an object of quotes"]
    errors = []
    for name, quote in evidence.items():
        nested = {SYMPTOMS: SYMPTOM_NAMES, DISTORTIONS: DISTORTION_NAMES}.get(name)
        if name not in FIELDS:
            errors.append(f"unknown field 'evidence.{name}'")
        elif nested is None and not isinstance(quote, str):
            errors.append(f"field 'evidence.{name}' must be a string")
        elif nested is not None and not isinstance(quote, dict):
            errors.append(f"field 'evidence.{name}' must be an object of quotes")
        elif nested is not None:
            errors += [f"field 'evidence.{name}.{k}' must be a string quoting a listed entry"
                       for k, v in quote.items() if k not in nested or not isinstance(v, str)]
    return errors
