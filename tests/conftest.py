"""Shared fixtures: the real demo model and the real test conversations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_PROFILES = Path(__file__).resolve().parents[2] / "shared/data/eeyore_test_profiles.json"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the embedded GGUF (once per machine)."""
    from eeyore.model.convert import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def conversations() -> list[list[dict]]:
    """The 12 real conversations of the reference test set (system prompt first)."""
    if not SHARED_PROFILES.is_file():
        pytest.skip(f"{SHARED_PROFILES} is not available")
    return [record["conversation"] for record in json.loads(SHARED_PROFILES.read_text())]
