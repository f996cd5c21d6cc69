"""bench/gpu_suite.py: one line and status 2 without a GPU; its dry run exercises every measured
section on the CPU with tiny shapes (the kernels through Triton's interpreter)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the GPU suite")


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SUITE)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_suite: no CUDA device")


def test_dry_run_exercises_every_section(tmp_path, monkeypatch, tiny_ckpt):
    if importlib.util.find_spec("triton") is None:  # found, not imported: `kernels` must import it first
        pytest.skip("triton is not installed")
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    sections = suite.SECTIONS
    # the server: the tiny checkpoint's shape and tokenizer with fresh random weights, as on a GPU
    # machine that has an 8B config and tokenizer but not the weights
    assert suite.main(["--dry-run-cpu", "--out", str(tmp_path), "--server-model", str(tiny_ckpt), "--server-random-weights"]) == 0
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(sections) <= set(results) and not any("error" in results[s] or "skipped" in results[s] for s in sections)
    assert all(row["passed"] for row in results["kernels"].values()) and len(results["kernels"]) == 5
    assert set(results["kernel_speed"]) == {"rms_norm", "apply_rope", "swiglu", "linear_cross_entropy"}
    assert results["parity"]["argmax_agreement"] == 1.0
    assert results["decode"]["batch 32"]["tokens_per_s"] > 0 and results["sft"]["tokens_per_s"] > 0
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert results["server"]["out tok/s"] > 0 and results["server"]["model"].endswith("random weights")
    c = results["compiled_decode"]
    assert c["batch 1 tokens_equal_until"] == c["batch 1 tokens_compared"] == 5  # 1 compiling step, 4 timed
    assert c["batch 32 tokens_equal_until"] == c["batch 32 tokens_compared"] == 5
    assert c["batch 1 first_logits_relative_error"] < 1e-5 and c["batch 32 first_logits_relative_error"] < 1e-5
    assert markdown.startswith("## GPU suite: CPU") and "| linear_cross_entropy |" in markdown
    assert "Fused cross-entropy peak memory" not in markdown  # no device peaks on the CPU
    assert "eager against the compiled step" in markdown and "| 32 |" in markdown and "Server (" in markdown


def _suite(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)
    spec.loader.exec_module(suite)
    return suite


def test_a_server_model_that_does_not_exist_fails_the_run(tmp_path, monkeypatch):
    """A model the user named is a failure when missing (exit 1), not a skipped section."""
    suite = _suite(monkeypatch)
    code = suite.main(["--dry-run-cpu", "--out", str(tmp_path), "--only", "server", "--server-model", str(tmp_path / "none")])
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert code == 1 and "error" in results["server"], results["server"]
    assert "--server-model" in results["command"]


def test_out_must_be_a_folder(tmp_path, monkeypatch, capsys):
    suite = _suite(monkeypatch)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit:
        suite.main(["--dry-run-cpu", "--out", str(tmp_path / "afile")])
    assert exit.value.code == 2 and "is a file" in capsys.readouterr().err
