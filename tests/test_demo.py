"""`python -m eeyore.demo --fast`: the whole method end to end on the embedded model, every artifact
checked, and a rerun that resumes instead of starting over."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eeyore.demo.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _demo(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "eeyore.demo", "--fast", "--out", str(out), *flags],
                          capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("demo")
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_ran_and_the_summary_is_printed(demo):
    out, stdout = demo
    for name, _, _ in STAGES:
        assert (out / ".stages" / f"{name}.done").is_file(), name
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == [name for name, _, _ in STAGES]
    assert "Eeyore demo: summary" in stdout
    for model in ("base", "sft", "dpo"):
        assert any(line.startswith(model) and "(not evaluated)" not in line for line in stdout.splitlines()), model


def test_checkpoints_load_and_differ(demo):
    import torch

    from eeyore.model import Llama

    out, _ = demo
    sft = Llama.from_pretrained(out / "models" / "sft")
    dpo = Llama.from_pretrained(out / "models" / "dpo")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.equal(sft(ids), dpo(ids)), "DPO left the SFT weights unchanged"
    rows = [json.loads(line) for line in (out / "data" / "sft" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][0]["role"] == "system" for r in rows)
    assert (out / "data" / "pairs.jsonl").read_text().strip()


def test_report_has_every_section_and_real_charts(demo):
    out, _ = demo
    report = (out / "report" / "report.md").read_text()
    for section in ("## Profile adherence", "## Linguistic authenticity", "## Runs"):
        assert section in report, section
    for run in ("base", "sft", "dpo"):
        assert f"| {run} |" in report, run
    charts = sorted((out / "report").glob("*.png"))
    assert {"training.png", "agreement.png"} <= {c.name for c in charts}
    for chart in charts:
        data = chart.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, chart.name
    assert (out / "report" / "agreement.md").read_text().count("|") > 10


def test_a_rerun_resumes_at_the_stage_it_stopped_in(demo):
    out, _ = demo
    (out / ".stages" / "report.done").unlink()
    (out / "report" / "report.md").unlink()
    proc = _demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if "done in an earlier run, skipped" in line]
    assert len(skipped) == len(STAGES) - 1
    assert "$ python -m eeyore.eval.report" in proc.stdout and "eeyore.train.sft" not in proc.stdout
    assert (out / "report" / "report.md").is_file()


def test_a_missing_profiles_file_is_one_line(tmp_path):
    proc = _demo(tmp_path, "--profiles", str(tmp_path / "nope.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.json" in proc.stderr
