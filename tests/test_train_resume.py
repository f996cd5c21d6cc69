"""Resume refuses a run that differs from the checkpoint's, and falls back past a damaged checkpoint
onto the same curve. A tiny byte-level model and made-up conversations: no shared data needed."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from safetensors.torch import load_file

from eeyore.train import sft
from serve_fixtures import tiny_checkpoint

RECORDS = [{"messages": [{"role": "user", "content": f"how are you, {name}?"}, {"role": "assistant", "content": f"{name} is tired."}]}
           for name in ("ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    tiny_checkpoint(root / "tiny")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (root / "reordered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[::-1]))
    return root


def flags(root: Path, out: str, *extra: str, data: str = "train.jsonl") -> list[str]:
    return ["--pretrain", str(root / "tiny"), "--dataset", str(root / data), "--input_key", "messages",
            "--apply_chat_template", "--max_len", "64", "--train_batch_size", "2", "--micro_train_batch_size", "1",
            "--max_epochs", "1", "--learning_rate", "1e-3", "--save_steps", "1", "--max_ckpt_num", "2",
            "--save_path", str(root / out), "--ckpt_path", str(root / out / "ckpt"), *extra]


def curve(root: Path, out: str) -> list[tuple]:
    log = [json.loads(line) for line in (root / out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in log]


@pytest.fixture(scope="module")
def baseline(root):
    sft.main(flags(root, "base"))  # 8 examples, 4 steps; checkpoints of steps 3 and 4 kept
    return curve(root, "base"), load_file(root / "base" / "model.safetensors")


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "trainer.pt", ".metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(root, baseline, damaged, capsys):
    out = f"fallback{damaged.replace('.', '_')}"
    sft.main(flags(root, out))
    step4 = root / out / "ckpt" / "global_step4"
    file = step4 / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a torn write
    sft.main(flags(root, out, "--load_checkpoint"))
    printed = capsys.readouterr().out
    assert f"warning: {step4} cannot be read" in printed and "resumed from" in printed and "global_step3 at step 3" in printed
    assert (root / out / "ckpt" / "global_step4.corrupt").is_dir()  # kept aside, never pruned as a good one
    assert curve(root, out) == baseline[0]  # step 4 redone from step 3: exactly the same curve
    params = load_file(root / out / "model.safetensors")
    assert all((params[k] == v).all() for k, v in baseline[1].items())


class Planted:
    """What a crafted `.metadata` could hold: unpickling it would create the marker folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_crafted_metadata_file_is_refused_not_run(root, baseline, capsys):
    sft.main(flags(root, "crafted"))
    step4 = root / "crafted" / "ckpt" / "global_step4"
    marker = root / "crafted" / "ran"
    (step4 / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    sft.main(flags(root, "crafted", "--load_checkpoint"))
    assert not marker.exists()
    assert "posix.mkdir is not part of checkpoint metadata; not unpickled" in capsys.readouterr().out
    assert curve(root, "crafted") == baseline[0]


@pytest.mark.parametrize("change, named", [
    (["--learning_rate", "2e-3"], "learning_rate 0.001 -> 0.002"),
    (["--max_epochs", "2"], "max_epochs 1 -> 2; total_steps 4 -> 8"),
    (["--lr_warmup_ratio", "0.5"], "warmup_steps 1 -> 2"),
    (["--seed", "7"], "seed 42 -> 7"),
])
def test_resume_refuses_a_changed_schedule_rate_or_seed(root, baseline, change, named, capsys):
    with pytest.raises(SystemExit) as exit:
        sft.main(flags(root, "base", "--load_checkpoint", *change))
    assert exit.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bars
    assert len(err) == 1 and err[0].startswith(f"error: {root / 'base' / 'ckpt' / 'global_step4'}: cannot resume") and named in err[0]


def test_resume_refuses_reordered_data_and_says_when_nothing_is_readable(root, baseline, capsys):
    with pytest.raises(SystemExit):
        sft.main(flags(root, "base", "--load_checkpoint", data="reordered.jsonl"))
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train_data '" in err and "train_examples" not in err  # same count, other order

    sft.main(flags(root, "broken"))
    for step in (3, 4):
        (root / "broken" / "ckpt" / f"global_step{step}" / "trainer.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        sft.main(flags(root, "broken", "--load_checkpoint"))
    assert "no readable checkpoint left to resume from (all 2 were set aside as *.corrupt)" in capsys.readouterr().err
