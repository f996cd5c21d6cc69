"""The README's test command in a plain clone: no real test profiles beside the repository.

The tests are copied into a fresh folder with nothing beside it and run from there in a subprocess
(the package still imported from this checkout), which is what a clone without the shared data
sees, whether a module finds the data through the helper or not: every module must still collect,
and the tests that need the real profiles must skip with a reason instead of erroring.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from shared_data import SHARED_DATA_ENV

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def pytest_without_shared_data(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    clone = tmp_path / "clone"
    shutil.copytree(TESTS, clone / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != SHARED_DATA_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)


def test_whole_suite_collects_without_the_shared_data(tmp_path):
    run = pytest_without_shared_data(tmp_path, "--collect-only", "-q", "tests")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]  # "N tests collected in Xs", or "..., M errors"
    assert "tests collected" in summary and "error" not in summary, run.stdout[-3000:]


def test_tests_that_need_the_real_profiles_skip_with_a_reason(tmp_path):
    # A cheap subset: one module that needs the profiles throughout, one that needs them in part,
    # and one fixture user (the real conversations fixture of conftest.py).
    run = pytest_without_shared_data(
        tmp_path, "-v", "-rs", "tests/test_make_preferences.py", "tests/test_profile.py",
        "tests/test_train_sft_mask.py::test_chatml_targets_on_demo_model")
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    summary = out.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" in summary and "error" not in summary, out[-3000:]
    lines = out.splitlines()
    for test in ("test_profile.py::test_train_style", "test_train_sft_mask.py::test_chatml"):
        assert any(test in line and "SKIPPED" in line for line in lines), (test, out[-3000:])
    # test_make_preferences.py skips as a whole module, at the helper that found the data missing
    assert not any("test_make_preferences.py::" in line for line in lines), out[-3000:]
    assert any(line.startswith("SKIPPED [1] tests/shared_data.py") for line in lines), out[-3000:]
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(SHARED_DATA_ENV in line and str(tmp_path) in line for line in reasons), out[-3000:]
