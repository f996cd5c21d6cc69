"""The SFT loop end to end on a tiny model with the demo model's tokenizer and real conversations:
the first loss against transformers, two gloo ranks against one, kill-and-resume against an
uninterrupted run, the saved checkpoint in transformers, and overfitting one conversation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eeyore.model import Llama, LlamaConfig
from eeyore.model.chat import ChatTemplate
from eeyore.model.tokenizer import Tokenizer
from eeyore.train import sft
from eeyore.train.data import load_rows

REPO = Path(__file__).resolve().parents[1]
# 8 examples: 4 steps; one CPU product for every run compared bit for bit (auto measures anew each run)
STEPS = ["--train_batch_size", "4", "--micro_train_batch_size", "1", "--max_epochs", "2", "--cpu_matmul", "onednn"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir, conversations):
    """A tiny random Llama with the demo model's tokenizer and ChatML template, and 8 short real
    conversations (a short system prompt, then the first four turns: 75 to 443 tokens)."""
    root = tmp_path_factory.mktemp("sft")
    tok = Tokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_ids, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(root / "tiny", tok)
    short = [conversations[i] for i in (0, 1, 2, 5, 6, 7, 9, 10)]  # the others' first turns are long
    records = [{"messages": [{"role": "system", "content": "You are a help-seeker."}] + c[1:5]} for c in short]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _args(root: Path, out: str, *extra: str) -> list[str]:
    return [
        "--pretrain", str(root / "tiny"), "--dataset", str(root / "train.jsonl"), "--input_key", "messages",
        "--apply_chat_template", "--multiturn", "--max_len", "512", "--learning_rate", "1e-3", "--l2", "0.1",
        "--save_path", str(root / out), "--ckpt_path", str(root / out / "ckpt"), *extra,
    ]


def _log(root: Path, out: str) -> list[dict]:
    return [json.loads(line) for line in (root / out / "train_log.jsonl").read_text().splitlines()]


def _curve(log: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss")) for r in log]


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def baseline(setup):
    """One process, fp32, 4 steps, a checkpoint every 2 steps, evaluation every 2 steps."""
    sft.main(_args(setup, "one", *STEPS, "--save_steps", "2", "--max_ckpt_num", "1", "--eval_dataset", str(setup / "train.jsonl"), "--eval_steps", "2"))
    return _log(setup, "one")


def test_log_has_one_line_per_step_and_eval(baseline):
    train = [r for r in baseline if "loss" in r]
    evals = [r for r in baseline if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert {"epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    # warmup of ceil(0.03 * 4) = 1 step: the first update runs at lr 0, then cosine to 10 %
    assert [r["lr"] for r in train] == pytest.approx([0.0, 1e-3, 1e-3 * (0.1 + 0.9 * 0.75), 1e-3 * (0.1 + 0.9 * 0.25)])


def test_only_the_newest_checkpoints_are_kept(setup, baseline):
    ckpt = setup / "one" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step4", "latest"]  # --max_ckpt_num 1
    assert {p.name for p in (ckpt / "global_step4").iterdir()} >= {".metadata", "trainer.pt", "rng_rank0.pt"}


def test_first_loss_matches_transformers(setup, baseline):
    """Step 1 is the mean over its micro-batches of each one's token-mean NLL, before any update."""
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_pretrained(setup / "tiny")
    fmt = sft.SFTFormat("messages", None, True, True, 512)
    examples, _ = sft.build_examples(load_rows(str(setup / "train.jsonl")), tok, ChatTemplate.for_tokenizer(tok), fmt, "t", show=False)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42)).tolist()  # DistributedSampler, epoch 0
    hf = AutoModelForCausalLM.from_pretrained(setup / "tiny", dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in order[:4]:  # micro-batches of one: the first global batch
            ids, labels = torch.tensor([examples[i].input_ids]), torch.tensor([examples[i].labels])
            losses.append(hf(input_ids=ids, labels=labels).loss)
    assert baseline[0]["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# Each run forces a different CPU product (--cpu_matmul): the one-rank baseline measured its own.
@pytest.mark.parametrize("flags", [["--zero_stage", "3", "--cpu_matmul", "onednn"],
                                   ["--zero_stage", "0", "--gradient_checkpointing", "--cpu_matmul", "blas"]],
                         ids=["zero3", "replicated+ac"])
def test_two_ranks_match_one(setup, baseline, flags):
    out = "two_" + flags[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "eeyore.train.sft", *_args(setup, out, *STEPS, *flags)]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _params(setup / "one"), _params(setup / out)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    ones = [r["loss"] for r in baseline if "loss" in r]
    assert [r["loss"] for r in _log(setup, out)] == pytest.approx(ones, rel=1e-5)


def test_killed_and_resumed_run_gives_the_same_curve(setup, baseline):
    args = _args(setup, "resumed", *STEPS, "--save_steps", "2", "--eval_dataset", str(setup / "train.jsonl"), "--eval_steps", "2")
    killed = _run([sys.executable, str(REPO / "tests" / "kill_after_step.py"), "3", "eeyore.train.sft", *args])
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after step 3
    assert [r["step"] for r in _log(setup, "resumed")][-1] == 3 and (setup / "resumed" / "ckpt" / "latest").read_text() == "global_step2"
    sft.main([*args, "--load_checkpoint"])  # restarts at step 3 from the step-2 checkpoint
    assert _curve(_log(setup, "resumed")) == _curve(baseline)  # CPU kernels are deterministic: exactly
    one, resumed = _params(setup / "one"), _params(setup / "resumed")
    for name in one:
        torch.testing.assert_close(resumed[name], one[name], rtol=0, atol=0, msg=name)


def test_saved_checkpoint_loads_in_transformers(setup, baseline, conversations):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = setup / "one"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([Tokenizer.from_pretrained(out).encode("I have not slept well in weeks.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    trained = _params(out)["model.embed_tokens.weight"]
    assert not torch.equal(trained, _params(setup / "tiny")["model.embed_tokens.weight"])  # it did train
    hf_tok = AutoTokenizer.from_pretrained(out)  # with the template it trained with
    conv = conversations[0][:3]
    assert hf_tok.apply_chat_template(conv, tokenize=False) == ChatTemplate.for_tokenizer(Tokenizer.from_pretrained(setup / "tiny")).render(conv)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_bf16_first_loss_close_to_fp32(setup, baseline):
    sft.main(_args(setup, "bf16", "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_epochs", "1", "--bf16", "--zero_stage", "3"))
    log = _log(setup, "bf16")
    # micro-batches of two weigh tokens differently from micro-batches of one: compare with a tolerance
    assert log[0]["loss"] == pytest.approx(baseline[0]["loss"], rel=2e-2)
    saved = _params(setup / "bf16")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_tiny_model_overfits_one_conversation(setup, tmp_path):
    conv = json.loads((setup / "train.jsonl").read_text().splitlines()[0])
    (tmp_path / "one.jsonl").write_text(json.dumps(conv) + "\n")
    sft.main([
        "--pretrain", str(setup / "tiny"), "--dataset", str(tmp_path / "one.jsonl"), "--input_key", "messages",
        "--apply_chat_template", "--multiturn", "--max_len", "512", "--train_batch_size", "1",
        "--micro_train_batch_size", "1", "--max_epochs", "100", "--learning_rate", "1e-2", "--save_path", str(tmp_path / "out"),
    ])
    losses = [r["loss"] for r in _log(tmp_path, "out")]
    assert losses[0] > 5 and losses[-1] < 0.1


def test_help_documents_every_reference_flag(capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--help"])
    text = capsys.readouterr().out
    reference = (
        "--max_len --dataset --input_key --train_batch_size --micro_train_batch_size --apply_chat_template "
        "--tokenizer_chat_template --max_samples --pretrain --save_path --save_steps --eval_dataset --eval_split "
        "--logging_steps --eval_steps --zero_stage --max_epochs --bf16 --flash_attn --l2 --multiturn --learning_rate "
        "--use_wandb --gradient_checkpointing --seed --lr_warmup_ratio --max_norm --adam_betas --ckpt_path "
        "--load_checkpoint --output_key"
    ).split()
    assert [f for f in reference if f not in text] == []
