"""Where the tests find the 12 real test conversations, and how they skip without them.

The real profiles are not part of the repository (they are the reference's test set). CI keeps them
in a `shared/data` folder beside the checkout; a plain clone has no such folder, and every test that
needs them must then skip with a reason instead of failing at import. Set `EEYORE_SHARED_DATA` to
another folder to use (or, pointed at a missing path, to hide) them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_DATA_ENV = "EEYORE_SHARED_DATA"


def shared_data_dir() -> Path:
    """The folder holding the real test data: `$EEYORE_SHARED_DATA`, else `shared/data` beside the repo."""
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED_PROFILES = shared_data_dir() / "eeyore_test_profiles.json"
SKIP_REASON = (f"the real test profiles are not present at {SHARED_PROFILES} "
               f"(set {SHARED_DATA_ENV} to the folder that holds eeyore_test_profiles.json)")
needs_shared = pytest.mark.skipif(not SHARED_PROFILES.is_file(), reason=SKIP_REASON)


def shared_records() -> list[dict]:
    """The 12 records (profile + conversation); skips the calling module when they are absent."""
    if not SHARED_PROFILES.is_file():
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return json.loads(SHARED_PROFILES.read_text())
