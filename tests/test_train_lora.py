"""LoRA SFT and DPO on the tiny checkpoint: only adapters train; the merged checkpoint is base +
adapters computed by hand; the PEFT-layout adapter loads in peft with the same logits; two gloo
ranks equal one; a killed run resumes exactly; DPO's reference is the frozen base."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eeyore.model import Llama
from eeyore.train import dpo, sft

REPO = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8
LORA = ["--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--target_modules", "q_proj", "v_proj", "down_proj"]
STEPS = ["--train_batch_size", "4", "--micro_train_batch_size", "1", "--max_epochs", "2", "--learning_rate", "1e-2",
         "--lr_warmup_ratio", "0", "--max_len", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    rows = [{"input": f"how are you, {i}?", "output": f"not great, {i}."} for i in range(8)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _args(tiny_ckpt: Path, root: Path, out: str, *extra: str) -> list[str]:
    return ["--pretrain", str(tiny_ckpt), "--dataset", str(root / "d.jsonl"), "--output_key", "output", *STEPS, *LORA,
            "--save_path", str(root / out), "--ckpt_path", str(root / out / "ckpt"), *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one(tiny_ckpt, data) -> Path:
    sft.main(_args(tiny_ckpt, data, "one", "--save_steps", "2"))
    return data / "one"


def test_only_adapters_change_and_the_merge_is_base_plus_b_a(tiny_ckpt, one):
    base, merged = load_file(tiny_ckpt / "model.safetensors"), load_file(one / "model.safetensors")
    adapter = load_file(one / "adapter" / "adapter_model.safetensors")
    config = json.loads((one / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert set(adapter) == {f"base_model.model.model.layers.{n}.{p}.lora_{m}.weight" for n in range(2)
                            for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for m in "AB"}
    assert merged.keys() == base.keys()
    for name, w in base.items():
        key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if key not in adapter:
            assert torch.equal(merged[name], w), f"{name} changed without an adapter"
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        assert b.abs().max() > 0  # the adapter trained
        torch.testing.assert_close(merged[name], w + ALPHA / RANK * b @ adapter[key], rtol=0, atol=1e-6)


def _by_hand(tiny_ckpt: Path, adapter: dict[str, torch.Tensor]) -> Llama:
    """The base model with each adapter's term added by a plain hook: y + s * x A^T B^T."""
    model = Llama.from_pretrained(tiny_ckpt, dtype=torch.float32)
    for name, module in model.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in adapter:
            a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
            module.register_forward_hook(lambda m, inp, out, a=a, b=b: out + ALPHA / RANK * (inp[0] @ a.t()) @ b.t())
    return model


def test_merged_logits_equal_base_plus_adapters_and_peft_loads_the_adapter(tiny_ckpt, one):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([list(b"how are you, 3? not great.")])
    adapter = load_file(one / "adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        merged = Llama.from_pretrained(one, dtype=torch.float32)(ids)
        by_hand = _by_hand(tiny_ckpt, adapter)(ids)
        base = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, one / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft_logits, merged, rtol=1e-5, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # the adapter matters


def test_two_gloo_ranks_equal_one(tiny_ckpt, data, one):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = _run([*torchrun, "-m", "eeyore.train.sft", *_args(tiny_ckpt, data, "two", "--zero_stage", "3")])
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(one / "adapter" / "adapter_model.safetensors"), load_file(data / "two" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    assert [r["loss"] for r in _log(data / "two")] == pytest.approx([r["loss"] for r in _log(one)], rel=1e-5)


def test_killed_lora_run_resumes_exactly(tiny_ckpt, data, one):
    args = _args(tiny_ckpt, data, "resumed", "--save_steps", "2")
    killed = _run([sys.executable, str(REPO / "tests" / "kill_after_step.py"), "3", "eeyore.train.sft", *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    sft.main([*args, "--load_checkpoint"])
    assert [(r["step"], r["loss"]) for r in _log(data / "resumed")] == [(r["step"], r["loss"]) for r in _log(one)]
    a, b = load_file(one / "adapter" / "adapter_model.safetensors"), load_file(data / "resumed" / "adapter" / "adapter_model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_dpo_uses_the_frozen_base_as_reference(tiny_ckpt, tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}.", "rejected": f"no no {i}!"} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail("a second model was loaded"))
    dpo.main(["--pretrain", str(tiny_ckpt), "--dataset", str(tmp_path / "p.jsonl"), "--prompt_key", "prompt",
              "--train_batch_size", "2", "--micro_train_batch_size", "1", "--max_epochs", "2", "--learning_rate", "1e-2",
              "--lr_warmup_ratio", "0", "--save_path", str(tmp_path / "out"), *LORA])
    log = _log(tmp_path / "out")
    assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy = reference at the start
    assert log[-1]["reward_margin"] != 0 and log[-1]["chosen_reward"] != 0  # the reference stayed the base
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_only_adapters_are_trainable_and_optimised(tiny_ckpt):
    from eeyore.train.lora import LoRASpec
    from eeyore.train.optim import build_optimizer
    from eeyore.train.parallel import close_distributed, init_distributed, load_sharded

    d = init_distributed()
    try:
        spec = LoRASpec(RANK, ALPHA, 0.0, ("q_proj", "v_proj", "down_proj"))
        model = load_sharded(str(tiny_ckpt), d, zero_stage=2, lora=spec)
        names = {id(p): n for n, p in model.named_parameters()}
        optimised = [names[id(p)] for g in build_optimizer(model, 1e-3, 0.0, (0.9, 0.95)).param_groups for p in g["params"]]
        assert sorted(optimised) == sorted(n for n in names.values() if ".lora_" in n) and len(optimised) == 2 * 3 * 2
        assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    finally:
        close_distributed()
