"""The one profile schema the trainers and the evaluator use, as the studio's pages need it."""
from __future__ import annotations

from typing import Any

from eeyore.profile import ProfileError, load_profiles, render_system_prompt, validate_profile

__all__ = ["ProfileError", "check_record", "load_records", "system_prompt"]


def check_record(record: Any, where: str = "the profile") -> dict[str, Any]:
    """`record` if it follows the schema, else ProfileError naming the field."""
    validate_profile(record, 0, where=where)
    return record


def system_prompt(record: dict[str, Any]) -> str:
    """The system prompt exactly as the training data renders it."""
    return render_system_prompt(record)


def load_records(path: str | None) -> list[dict[str, Any]]:
    """The records of a profiles file (None: the shipped sample profiles)."""
    return [p.record for p in load_profiles(path)]
