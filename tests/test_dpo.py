"""DPO training end to end on a tiny random checkpoint, with pairs cut from the real conversations."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from eeyore.model import Llama
from eeyore.train.dpo import DPORecipe, load_reference, main, sequence_logps
from eeyore.train.dpo_data import PreferencePair, collate_pairs
from eeyore.train.dpo_loss import DPOLossConfig
from eeyore.train.parallel import close_distributed, init_distributed, load_sharded
from serve_fixtures import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, conversations) -> Path:
    """Chosen = a real client reply, rejected = a generic assistant-style one, prompt = the
    supporter's message before it (kept short: the tiny model's tokens are bytes)."""
    records = []
    for conv in conversations:
        for j, m in enumerate(conv):
            if m["role"] == "assistant" and j > 1 and conv[j - 1]["role"] == "user":
                records.append({
                    "prompt": [{"role": "user", "content": conv[j - 1]["content"][:60]}],
                    "chosen": m["content"][:50],
                    "rejected": [{"role": "assistant", "content": "Thank you! Here are some tips:"[: 20 + len(records) % 10]}],
                })
                break
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def flags(ckpt, data, out, *extra):
    return ["--pretrain", str(ckpt), "--dataset", str(data), "--apply_chat_template", "--prompt_key", "prompt",
            "--max_len", "256", "--save_path", str(out), "--ckpt_path", str(out / "ckpts"), *extra]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_logs(a: list[dict], b: list[dict], keys=("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "policy_chosen_logps", "grad_norm")):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (k, x["step"])


def test_reference_gets_no_gradient(ckpt):
    policy, reference = Llama.from_pretrained(ckpt).train(), Llama.from_pretrained(ckpt)
    reference.requires_grad_(False)
    recipe = DPORecipe(DPOLossConfig(beta=0.1, nll_loss_coef=0.3), pad_id=0, reference=reference)
    batch = recipe.collate([PreferencePair([5, 6, 7, 8], [5, 6, 9], 2), PreferencePair([1, 2, 3], [1, 2, 4, 4], 2)])
    loss, metrics = recipe.loss(policy, batch)
    # identical models: z = 0, loss = log 2 + 0.3 * NLL of the chosen side
    assert loss.item() == pytest.approx(math.log(2) + 0.3 * metrics["nll_loss"].item(), abs=1e-6)
    assert metrics["preference_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters())


def test_offload_equals_resident_reference_and_checkpoint_loads(ckpt, pairs_file, tmp_path):
    common = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--learning_rate", "1e-3", "--max_samples", "8", "--max_epochs", "2"]
    main(flags(ckpt, pairs_file, tmp_path / "resident", *common))
    main(flags(ckpt, pairs_file, tmp_path / "offload", *common, "--ref_offload"))
    resident, offload = log(tmp_path / "resident"), log(tmp_path / "offload")
    assert len(resident) == 4
    assert resident[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
    assert resident[0]["reward_accuracy"] == 0.0 and resident[0]["chosen_reward"] == 0.0
    assert resident[-1]["loss"] < math.log(2)  # it learns (lr is 0 at step 1: warmup)
    assert_same_logs(resident, offload)

    out = tmp_path / "offload"
    ours = Llama.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        start = Llama.from_pretrained(ckpt)
        assert not torch.allclose(start(ids), ours(ids))  # the saved model is the trained one


def test_reward_accuracy_reaches_one_when_overfitting(ckpt, pairs_file, tmp_path):
    out = tmp_path / "overfit"
    main(flags(ckpt, pairs_file, out, "--train_batch_size", "4", "--micro_train_batch_size", "4", "--max_samples", "4",
               "--learning_rate", "3e-3", "--max_epochs", "12", "--beta", "0.5", "--ref_offload"))
    last = log(out)[-1]
    assert last["reward_accuracy"] == 1.0 and last["loss"] < 0.2 and last["reward_margin"] > 0


def run(args: list[str], launcher: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`launcher -m eeyore.train.dpo args`; with `kill_at`, SIGKILLed after that optimizer step."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    entry = ["-m"] if kill_at is None else [str(REPO / "tests" / "kill_after_step.py"), str(kill_at)]
    return subprocess.run([*launcher, *entry, "eeyore.train.dpo", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_equal_one(ckpt, pairs_file, tmp_path):
    # 7 pairs: one step of 4 per epoch, and the offloaded reference pass leaves rank 1 with
    # nothing to score in its last round (it must still join the collective forward)
    common = ["--train_batch_size", "4", "--micro_train_batch_size", "1", "--learning_rate", "1e-3", "--max_samples", "7", "--max_epochs", "3"]
    main(flags(ckpt, pairs_file, tmp_path / "one", *common))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = run(flags(ckpt, pairs_file, tmp_path / "two", *common, "--ref_offload", "--zero_stage", "3"), torchrun)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_logs(log(tmp_path / "one"), log(tmp_path / "two"))
    one, two = Llama.from_pretrained(tmp_path / "one"), Llama.from_pretrained(tmp_path / "two")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_killed_run_resumes_exactly(ckpt, pairs_file, tmp_path):
    common = ["--train_batch_size", "2", "--micro_train_batch_size", "1", "--learning_rate", "1e-3", "--max_samples", "6",
              "--max_epochs", "1", "--ref_offload", "--save_steps", "1"]
    main(flags(ckpt, pairs_file, tmp_path / "straight", *common))
    python = [sys.executable]
    killed = run(flags(ckpt, pairs_file, tmp_path / "resumed", *common), python, kill_at=2)
    assert killed.returncode != 0 and len(log(tmp_path / "resumed")) == 2
    resumed = run(flags(ckpt, pairs_file, tmp_path / "resumed", *common, "--load_checkpoint"), python)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_logs(log(tmp_path / "straight"), log(tmp_path / "resumed"))


def test_reference_command_line_parses():
    """The flags of the reference's DPO script (code/train_dpo_slurm_example.sh), with the same meanings."""
    from eeyore.train.dpo import parse_args

    args = parse_args(
        "--save_path out --save_steps 30 --logging_steps 30 --eval_dataset prefs --eval_steps 200 --eval_split train "
        "--train_batch_size 8 --micro_train_batch_size 1 --pretrain sft --bf16 --max_epochs 1 --max_len 5120 "
        "--zero_stage 3 --learning_rate 5e-7 --beta 0.1 --dataset prefs --apply_chat_template --chosen_key chosen "
        "--rejected_key rejected --prompt_key prompt --flash_attn --gradient_checkpointing --use_wandb KEY --ref_offload".split()
    )
    assert (args.max_len, args.learning_rate, args.beta, args.zero_stage, args.prompt_key) == (5120, 5e-7, 0.1, 3, "prompt")
    assert args.ref_offload and args.bf16 and args.apply_chat_template and args.ref_pretrain == "sft"
    assert (args.label_smoothing, args.ipo, args.nll_loss_coef) == (0.0, False, 0.0)


def test_bf16_reference_keeps_bf16_shards_and_scores_like_the_policy(ckpt):
    d = init_distributed()
    try:
        reference = load_reference(argparse.Namespace(ref_pretrain=str(ckpt), bf16=True), d)
        policy = load_sharded(str(ckpt), d, zero_stage=3, bf16=True)  # fp32 master weights, bf16 compute
        assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in policy.parameters()} == {torch.float32}
        batch = collate_pairs([PreferencePair([5, 6, 7, 8], [5, 6, 9], 2), PreferencePair([1, 2, 3], [1, 2, 4, 4], 2)], 0)
        with torch.no_grad():
            ours, theirs = sequence_logps(reference, batch)[0], sequence_logps(policy, batch)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    finally:
        close_distributed()
