"""User errors in training end with one line and exit status 1, once, under torchrun too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eeyore.train import dpo, sft
from eeyore.train.parallel import TRACEBACK_ENV, launch
from serve_fixtures import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TOO_LONG = "error: 0 training examples do not fill one batch"  # both records dropped by --max_len


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    tiny_checkpoint(root / "tiny")
    long_prompt = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": long_prompt}) + "\n" for _ in range(2)))
    pair = {"prompt": long_prompt[:1], "chosen": "yes", "rejected": "no"}
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for _ in range(2)))
    return root


def sft_flags(root: Path) -> list[str]:
    return ["--pretrain", str(root / "tiny"), "--dataset", str(root / "chat.jsonl"), "--input_key", "messages",
            "--apply_chat_template", "--max_len", "16", "--train_batch_size", "2", "--micro_train_batch_size", "1",
            "--save_path", str(root / "out"), "--ckpt_path", str(root / "out" / "ckpt")]


def run(launcher: list[str], args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def our_frames(output: str) -> list[str]:
    """Traceback lines inside this package (torchrun's own failure report is not ours to change)."""
    return [line for line in output.splitlines() if line.strip().startswith("File ") and "eeyore" in line]


def test_every_record_dropped_under_torchrun_prints_one_line_once(setup):
    done = run(TORCHRUN, ["-m", "eeyore.train.sft", *sft_flags(setup)])
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(TOO_LONG) == 1, output[-4000:]
    assert not our_frames(output) and "rank 1: error" not in output, output[-4000:]


def test_an_error_on_another_rank_alone_is_reported_by_that_rank(setup, tmp_path):
    script = tmp_path / "rank1_fails.py"
    script.write_text(
        "import torch.distributed as dist\nfrom eeyore.train.parallel import launch\n"
        "with launch() as d:\n"
        "    if d.rank == 1:\n        raise FileNotFoundError('data.jsonl: no such file on rank 1')\n"
        "    dist.barrier()  # rank 0 waits for a rank that never comes\n"
    )
    done = run(TORCHRUN, [str(script)])
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("rank 1: error: data.jsonl: no such file on rank 1") == 1, output[-4000:]
    assert not our_frames(output), output[-4000:]


def test_dpo_in_one_process_prints_one_line_and_exits_1(setup):
    flags = ["--pretrain", str(setup / "tiny"), "--dataset", str(setup / "pairs.jsonl"), "--apply_chat_template",
             "--prompt_key", "prompt", "--max_len", "16", "--train_batch_size", "2", "--micro_train_batch_size", "1",
             "--save_path", str(setup / "dpo"), "--ckpt_path", str(setup / "dpo" / "ckpt")]
    done = run([sys.executable], ["-m", "eeyore.train.dpo", *flags])
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: 0 training examples do not fill one batch of --train_batch_size 2"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_in_process_main_exits_with_status_1(setup, capsys):
    with pytest.raises(SystemExit) as exit:
        sft.main([*sft_flags(setup)[:3], str(setup / "missing.jsonl"), *sft_flags(setup)[4:]])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: dataset ")
    with pytest.raises(SystemExit):
        dpo.main(["--pretrain", str(setup / "missing-model"), "--dataset", str(setup / "pairs.jsonl")])
    assert "missing-model" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_the_variable_shows_user_errors_too(monkeypatch):
    with pytest.raises(RuntimeError, match="a bug"):
        with launch():
            raise RuntimeError("a bug")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="bad flag"):
        with launch():
            raise ValueError("bad flag")


def test_a_gpu_rank_that_does_not_exist_stops_the_cli_with_one_line(setup, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for main, flags in ((sft.main, sft_flags(setup)), (dpo.main, ["--pretrain", str(setup / "tiny"), "--dataset", "x"])):
        with pytest.raises(SystemExit) as exit:
            main(flags)
        assert exit.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: LOCAL_RANK=3 but this node has 1 visible GPU(s)") and "\n" not in err


@pytest.mark.parametrize("recipe", [sft, dpo])
def test_the_kernels_flag_selects_the_training_loss(recipe):
    from eeyore.train import loss
    from eeyore.train.parallel import close_distributed
    from eeyore.train.trainer import start_run

    try:
        for mode in ("off", "on", "auto"):
            start_run(recipe.parse_args(["--dataset", "x", "--kernels", mode]))
            close_distributed()
            assert loss._KERNELS == mode
    finally:
        loss.use_kernels("auto")
