"""End to end: the project's server (a tiny random model with the SmolLM2 tokenizer) plays the
client, the judge and the counsellor; the evaluator finishes, writes a complete results file
and a report, and a rerun resumes entirely from the cache."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from eeyore.profile import load_profiles, traits
from eeyore.eval.__main__ import main as eval_main
from eeyore.eval.interview import questions_for
from eeyore.eval.report import main as report_main

REPO = Path(__file__).resolve().parents[1]


def tiny_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    from eeyore.model import Llama, LlamaConfig
    from eeyore.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         max_position_embeddings=4096, bos_token_id=tok.bos_id, eos_token_id=tok.eos_ids,
                         tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    Llama(config).save_pretrained(out_dir, tokenizer=tok)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, smollm2_dir):
    model = tiny_model(tmp_path / "tiny", smollm2_dir)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "eeyore.serve", "--model", str(model), "--served-model-name", "tiny",
         "--port", str(port), "--max-batch-size", "4", "--threads", "1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the model loads after the server starts listening
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server never became healthy")
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_evaluator_against_the_project_server(server, tmp_path):
    args = ["--experiment-name", "eeyore", "--experiment-model", "tiny", "--base-url", server, "--api-key", "none",
            "--judger-model", "tiny", "--judger-base-url", server, "--judger-api-key", "none",
            "--max-tokens", "8", "--judger-max-tokens", "4", "--end-index", "2", "--max-traits", "2",
            "--free-turns", "2", "--judge-realism", "--concurrency", "4", "--output-dir", str(tmp_path / "runs")]
    assert eval_main(args) == 0
    run_dir = tmp_path / "runs" / "eeyore_tiny"
    results = json.loads((run_dir / "results.json").read_text())
    plan = [t for p in load_profiles()[:2] for t in traits(p)[:2]]
    assert results["sessions"] == {"total": len(plan) + 2, "done": len(plan) + 2, "failed": 0}
    sessions = [s for p in results["profiles"] for s in p["traits"]]
    assert [(s["category"], s["trait"]) for s in sessions] == [(t.category, t.name) for t in plan]
    for s, t in zip(sessions, plan):
        assert [m["content"] for m in s["messages"][1::2]] == questions_for(t)
        assert all(isinstance(m["content"], str) for m in s["messages"])
        assert 1 <= len(s["judge"]["replies"]) <= 3
    adh = results["adherence"]["all"]
    assert adh["n"] + adh["missing"] == len(plan)  # a random model's "scores" are mostly missing, and counted
    assert all(p["free"]["realism"]["replies"] for p in results["profiles"])
    assert len(results["profiles"][0]["free"]["messages"]) == 1 + 2 * 2
    assert results["timing"]["requests"] >= len(plan) * 4 and results["timing"]["sessions_cached"] == 0

    # the rerun does nothing new, and keeps the timing of the run that did the work
    assert eval_main(args) == 0
    again = json.loads((run_dir / "results.json").read_text())
    assert again["timing"]["sessions_run"] == 0 and again["timing"]["requests"] == results["timing"]["requests"]
    assert again["timing"]["wall_s"] >= results["timing"]["wall_s"] and again["timing"]["invocations"] == 2
    assert again["profiles"] == results["profiles"] and again["adherence"] == results["adherence"]

    assert report_main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| eeyore_tiny | eeyore | tiny |" in report and "eeyore_tiny (free)" in report
    assert (tmp_path / "report" / "adherence.png").exists() and (tmp_path / "report" / "authenticity.png").exists()
