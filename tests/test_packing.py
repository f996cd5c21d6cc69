"""`--packing_samples`: a packed micro-batch gives the padded one's loss and update, for SFT and DPO,
in one process and across two gloo processes under FSDP2."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eeyore.model import Llama, LlamaConfig
from eeyore.train import dpo, sft
from eeyore.train.dpo_data import PreferencePair
from eeyore.train.dpo_loss import DPOLossConfig
from eeyore.train.loss import IGNORE_INDEX
from eeyore.train.packing import PackedLayout
from eeyore.train.tokens import Example
from serve_fixtures import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORDS = "I feel tired most days and nothing seems to help lately so I stay home".split()


def tiny_model(vocab: int = 97) -> Llama:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return Llama(config)


def random_example(rng: random.Random, vocab: int) -> Example:
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(5, 40))]
    labels = [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids]
    return Example(ids, labels)


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_layout_restarts_positions_and_numbers_sequences():
    layout = PackedLayout.of([3, 1, 2])
    assert layout.positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 6] and layout.cu_seqlens.dtype == torch.int32
    assert layout.sequence_ids().tolist() == [0, 0, 0, 1, 2, 2]


def test_packed_sft_targets_never_cross_examples():
    batch = sft.collate_packed([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5])])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.tokens == 5


def test_packed_sft_micro_batch_equals_padded():
    rng = random.Random()
    torch.manual_seed(rng.randrange(1000))
    model, examples = tiny_model(), [random_example(rng, 97) for _ in range(4)]
    padded = loss_and_grads(model, sft.sft_loss, sft.collate(examples, pad_id=0))
    packed = loss_and_grads(model, sft.sft_loss, sft.collate_packed(examples))
    assert_same(padded, packed)


def test_packed_dpo_micro_batch_equals_padded():
    rng = random.Random()
    torch.manual_seed(rng.randrange(1000))
    model = tiny_model()

    def pair(prompt_len):  # prompt_len 0 too: a sequence's first token is never scored
        prompt = [rng.randrange(97) for _ in range(prompt_len)]
        return PreferencePair(prompt + [rng.randrange(97) for _ in range(rng.randrange(2, 20))],
                              prompt + [rng.randrange(97) for _ in range(rng.randrange(2, 20))], prompt_len,
                              (-rng.random() * 30, -rng.random() * 30))

    pairs = [pair(n) for n in (0, 7, 15)]
    config = DPOLossConfig(beta=0.5, label_smoothing=0.0, ipo=False, nll_loss_coef=0.3)
    padded_recipe, packed_recipe = dpo.DPORecipe(config, pad_id=0), dpo.DPORecipe(config, pad_id=0, packing=True)
    padded = loss_and_grads(model, padded_recipe.loss, padded_recipe.collate(pairs))
    packed = loss_and_grads(model, packed_recipe.loss, packed_recipe.collate(pairs))
    assert_same(padded, packed)
    assert packed_recipe.collate(pairs).input_ids.shape[0] == 1


# -- the trainers end to end: one and two processes -------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny byte-level checkpoint, 8 SFT conversations and 8 preference pairs of unequal lengths."""
    root = tmp_path_factory.mktemp("packing")
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi)))

    conversations = [{"messages": [{"role": "user", "content": text(2, 10)}, {"role": "assistant", "content": text(2, 25)}]} for _ in range(8)]
    pairs = [{"prompt": [{"role": "user", "content": text(2, 10)}], "chosen": text(1, 8), "rejected": text(1, 8)} for _ in range(8)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations))
    (root / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return tiny_checkpoint(root / "tiny"), root / "sft.jsonl", root / "dpo.jsonl"


def _flags(ckpt: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrain", str(ckpt), "--dataset", str(dataset), "--apply_chat_template", "--max_len", "256",
        "--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_epochs", "2", "--learning_rate", str(LR),
        "--save_path", str(out), "--ckpt_path", str(out / "ckpts"), *extra,
    ]


def _torchrun(module: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_runs(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    log_a, log_b = ([json.loads(x) for x in (p / "train_log.jsonl").read_text().splitlines()] for p in (a, b))
    assert len(log_a) == len(log_b) == 2
    for x, y in zip(log_a, log_b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=2e-5), (k, x["step"])  # rewards start at 0
    one, two = Llama.from_pretrained(a), Llama.from_pretrained(b)
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        # AdamW divides by the gradient's own size, so where a gradient is ~0 float noise can move
        # a weight by up to the learning rate: allow that for a handful of elements, no more.
        off = (p - q).abs()
        assert (off > 2e-5).float().mean() < 1e-3 and off.max() <= LR, (name, off.max())


LR = 1e-3


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_packed_training_equals_padded_in_one_and_two_processes(recipe, data, tmp_path):
    ckpt, sft_data, dpo_data = data
    main, dataset, extra = (sft.main, sft_data, ["--input_key", "messages"]) if recipe == "sft" else (
        dpo.main, dpo_data, ["--prompt_key", "prompt", "--ref_offload"])
    keys = ("loss", "grad_norm") + (("chosen_reward", "reward_margin") if recipe == "dpo" else ())
    main(_flags(ckpt, dataset, tmp_path / "padded", *extra))
    main(_flags(ckpt, dataset, tmp_path / "packed", *extra, "--packing_samples"))
    _assert_same_runs(tmp_path / "padded", tmp_path / "packed", keys)
    # Two ranks deal the examples into other micro-batches (other token means): compare like with like.
    _torchrun(f"eeyore.train.{recipe}", _flags(ckpt, dataset, tmp_path / "padded2", *extra))
    _torchrun(f"eeyore.train.{recipe}", _flags(ckpt, dataset, tmp_path / "packed2", *extra, "--packing_samples"))
    _assert_same_runs(tmp_path / "padded2", tmp_path / "packed2", keys)


def test_flash_attn_flag_says_when_it_does_nothing():
    from eeyore.train.packing import flash_attn_warning

    assert "no effect on the CPU" in flash_attn_warning(torch.device("cpu"), packing=True)


def test_gpu_rank_beyond_the_visible_gpus_is_an_error(monkeypatch):
    from eeyore.train import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parallel.training_device(1) == torch.device("cuda", 1)
    with pytest.raises(parallel.DeviceError, match="LOCAL_RANK=2 but this node has 2 visible GPU"):
        parallel.training_device(2)


def test_unusable_cuda_is_an_error_not_a_silent_cpu_run(monkeypatch):
    from eeyore.train import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel, "_gpu_present", lambda: True)
    with pytest.raises(parallel.DeviceError, match="torch cannot use CUDA"):
        parallel.training_device(0)
    monkeypatch.setattr(parallel, "_gpu_present", lambda: False)
    assert parallel.training_device(0) == torch.device("cpu")
