"""Every flag of OpenRLHF v0.8.2's train_sft and train_dpo gets an answer; the schedules against
transformers; dataset mixing; the run's messages, its logs' secrets and its TensorBoard files."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from eeyore.train import dpo, flags, sft
from eeyore.train.config import TrainConfig
from eeyore.train.mixing import interleave
from eeyore.train.optim import lr_factor

# `add_argument("--...")` of openrlhf/cli/train_sft.py and train_dpo.py at tag v0.8.2 (68 + 70 flags)
OPENRLHF_SFT = """
--save_path --save_steps --save_hf_ckpt --disable_ds_ckpt --logging_steps --eval_steps --ckpt_path --max_ckpt_num
--max_ckpt_mem --load_checkpoint --use_ds_universal_ckpt --micro_train_batch_size --train_batch_size --max_norm
--gradient_checkpointing --deepcompile --seed --full_determinism --local_rank --zero_stage --bf16 --zpg --adam_offload
--flash_attn --use_liger_kernel --grad_accum_dtype --overlap_comm --gradient_checkpointing_use_reentrant
--disable_fast_tokenizer --ds_tensor_parallel_size --max_epochs --aux_loss_coef --pretrain --learning_rate
--lr_warmup_ratio --pretrain_mode --lr_scheduler --l2 --adam_betas --ring_attn_size --ring_head_stride --load_in_4bit
--lora_rank --lora_alpha --target_modules --lora_dropout --packing_samples --dataset --dataset_probs --eval_dataset
--dataset_split --eval_split --max_samples --train_split --multiturn --input_key --output_key --input_template
--apply_chat_template --tokenizer_chat_template --max_len --use_wandb --wandb_org --wandb_group --wandb_project
--wandb_run_name --use_tensorboard --use_ms
""".split()
OPENRLHF_DPO = """
--save_path --save_steps --save_hf_ckpt --disable_ds_ckpt --logging_steps --eval_steps --ckpt_path --max_ckpt_num
--max_ckpt_mem --use_ds_universal_ckpt --micro_train_batch_size --train_batch_size --load_checkpoint --max_norm
--gradient_checkpointing --deepcompile --seed --full_determinism --disable_fast_tokenizer --local_rank --zero_stage
--bf16 --ref_offload --learning_rate --lr_warmup_ratio --zpg --adam_offload --flash_attn --use_liger_kernel
--grad_accum_dtype --overlap_comm --gradient_checkpointing_use_reentrant --ds_tensor_parallel_size --max_epochs --l2
--beta --ipo --label_smoothing --aux_loss_coef --nll_loss_coef --adam_betas --ring_attn_size --ring_head_stride
--load_in_4bit --lora_rank --lora_alpha --target_modules --lora_dropout --packing_samples --pretrain --ref_pretrain
--dataset --dataset_probs --eval_dataset --dataset_split --eval_split --max_samples --prompt_key --chosen_key
--rejected_key --input_template --apply_chat_template --max_len --use_wandb --wandb_org --wandb_group --wandb_project
--wandb_run_name --use_tensorboard --use_ms
""".split()
MAPPED_FIELDS = {"--use_liger_kernel", "--deepcompile"}  # config fields whose help says what they map to
# Implemented flags the recipe turns down for now (another branch wires them): still one line, named.
PENDING = {"--use_liger_kernel"}


def _help(module) -> str:
    parser = flags.build_parser(type(module.parse_args(["--dataset", "x"])), "prog", "")
    return parser.format_help()


@pytest.mark.parametrize("module,reference", [(sft, OPENRLHF_SFT), (dpo, OPENRLHF_DPO)], ids=["sft", "dpo"])
def test_every_openrlhf_flag_is_implemented_mapped_or_refused(module, reference, capsys):
    assert len(reference) == len(set(reference)) == (68 if module is sft else 70)
    fields = set(type(module.parse_args(["--dataset", "x"])).__dataclass_fields__)
    parser = flags.build_parser(type(module.parse_args(["--dataset", "x"])), "prog", "")
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flag in reference:
        assert flag in helps, f"{flag} is not accepted"
        assert "(default:" in parser.format_help() and helps[flag], flag
        if flag in flags.REFUSED:
            kind, default, why = flags.REFUSED[flag]
            value = [] if kind is bool else [str({int: 2, float: 0.5, str: "fp16"}[kind])]
            with pytest.raises(SystemExit) as err:
                module.parse_args(["--dataset", "x", flag, *value])
            message = str(err.value.code)
            assert flag in message and why in message and "\n" not in message
        elif flag in flags.MAPPED or flag in MAPPED_FIELDS:
            assert helps[flag].startswith("mapped"), f"{flag}: {helps[flag]}"
        else:
            assert flag[2:] in fields, f"{flag} is neither a config field, nor mapped, nor refused"
    # every flag parses (refused ones at their default), and the refusals stop before any work
    for flag in reference:
        if flag not in flags.REFUSED and flag not in PENDING and parser._option_string_actions[flag].nargs == 0:
            module.parse_args(["--dataset", "x", "--apply_chat_template", flag])


def test_help_shows_every_default(capsys):
    for module in (sft, dpo):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = capsys.readouterr().out
        assert text.count("(default:") >= len(OPENRLHF_DPO if module is dpo else OPENRLHF_SFT)
    assert "--beta BETA" in _help(dpo) and "(default: 0.1)" in _help(dpo)


def test_mapped_flags_set_their_equivalents(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = sft.parse_args(["--dataset", "x", "--local_rank", "3", "--train_split", "dev", "--adam_betas", "0.8", "0.9"])
    import os

    assert os.environ["LOCAL_RANK"] == "3" and cfg.dataset_split == "dev" and cfg.adam_betas == (0.8, 0.9)
    with pytest.raises(SystemExit, match="--dataset_probs 0.7: needs one"):
        sft.parse_args(["--dataset", "a,b", "--dataset_probs", "0.7"])
    with pytest.raises(SystemExit, match="--target_modules qkv"):
        sft.parse_args(["--dataset", "a", "--target_modules", "qkv"])
    assert sft.parse_args(["--dataset", "x", "--grad_accum_dtype", "fp32"]).dataset == "x"


def test_wandb_key_stays_out_of_configs_and_logs():
    cfg = dpo.parse_args(["--dataset", "x", "--use_wandb", "s3cr3t-key"])
    assert cfg.use_wandb == "s3cr3t-key"
    assert "s3cr3t-key" not in repr(cfg) and "s3cr3t-key" not in json.dumps(cfg.public())
    assert cfg.public()["use_wandb"] is True


@pytest.mark.parametrize("name", ["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("total,ratio", [(40, 0.1), (7, 0.03)])
def test_schedule_matches_transformers(name, total, ratio):
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    extra = {"scheduler_specific_kwargs": {"min_lr": 1e-4 * 0.1}} if name == "cosine_with_min_lr" else {}
    warmup = {} if name == "constant" else {"num_warmup_steps": math.ceil(total * ratio)}
    theirs = get_scheduler(name, torch.optim.SGD([param], lr=1e-4), num_training_steps=total, **warmup, **extra)
    ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=1e-4), lr_factor(name, total, ratio))
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-20)
        for scheduler in (ours, theirs):
            scheduler.optimizer.step()
            scheduler.step()


def test_mixing_is_seeded_proportional_and_uses_every_row():
    a, b = [("a", i) for i in range(300)], [("b", i) for i in range(100)]
    mixed = interleave([a, b], [0.7, 0.3], seed=42)
    assert mixed == interleave([a, b], [0.7, 0.3], seed=42) and mixed != interleave([a, b], [0.7, 0.3], seed=1)
    assert set(a) <= set(mixed) and set(b) <= set(mixed)  # every dataset used up at least once
    n, share = len(mixed), Counter(src for src, _ in mixed)["a"] / len(mixed)
    assert abs(share - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)  # four standard errors of a binomial share


def test_input_template_and_pretrain_mode(tiny_ckpt):
    from eeyore.model.tokenizer import Tokenizer
    from eeyore.train.data import Row
    from eeyore.train.loss import IGNORE_INDEX

    tok = Tokenizer.from_pretrained(tiny_ckpt)
    row = Row({"input": "hi", "output": "yo"}, "row 1")
    cfg = sft.parse_args(["--dataset", "x", "--output_key", "output", "--input_template", "User: {}\nAssistant: "])
    ex = sft.make_example(row, tok, None, cfg.data_format())
    assert tok.decode(ex.input_ids) == "User: hi\nAssistant: yo<|im_end|>"
    assert [t for t in ex.labels if t != IGNORE_INDEX] == tok.encode("yo") + tok.eos_ids[:1]
    cfg = sft.parse_args(["--dataset", "x", "--pretrain_mode"])
    ex = sft.make_example(Row({"input": "all of it"}, "row 2"), tok, None, cfg.data_format())
    assert ex.labels == ex.input_ids == tok.encode("all of it") + tok.eos_ids[:1]
    cfg = sft.parse_args(["--dataset", "x", "--pretrain_mode", "--apply_chat_template", "--input_key", "m"])
    chat = Row({"m": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "row 3")
    from eeyore.model.chat import ChatTemplate

    ex = sft.make_example(chat, tok, ChatTemplate.for_tokenizer(tok), cfg.data_format())
    assert ex.labels == ex.input_ids


def _records(path, n=8):
    path.write_text("".join(json.dumps({"input": f"question {i}?", "output": f"answer number {i}."}) + "\n" for i in range(n)))
    return path


def _run_sft(tiny_ckpt, tmp_path, out, *extra):
    sft.main(["--pretrain", str(tiny_ckpt), "--dataset", str(_records(tmp_path / "d.jsonl")), "--output_key", "output",
              "--train_batch_size", "4", "--micro_train_batch_size", "2", "--learning_rate", "1e-3", "--max_len", "64",
              "--save_path", str(tmp_path / out), "--ckpt_path", str(tmp_path / out / "ckpt"), *extra])
    return [json.loads(line) for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]


def test_warmup_only_run_says_so_and_every_run_says_where_it_saved(tiny_ckpt, tmp_path, capsys):
    _run_sft(tiny_ckpt, tmp_path, "warm", "--max_epochs", "1", "--max_samples", "4")  # one step, in the warmup
    out = capsys.readouterr().out
    assert "run at learning rate 0" in out and f"model saved to {(tmp_path / 'warm').resolve()}" in out
    _run_sft(tiny_ckpt, tmp_path, "fine", "--max_epochs", "2")
    assert "learning rate 0" not in capsys.readouterr().out


def test_tensorboard_events_are_readable_and_checkpoints_follow_the_flags(tiny_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = _run_sft(tiny_ckpt, tmp_path, "tb", "--max_epochs", "3", "--use_tensorboard", str(tmp_path / "tb_events"),
                   "--save_steps", "2", "--save_hf_ckpt", "--max_ckpt_num", "5", "--max_ckpt_mem", "0")
    events = EventAccumulator(str(tmp_path / "tb_events"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in log], rel=1e-6) and len(losses) == 6
    ckpt = tmp_path / "tb" / "ckpt"
    # --max_ckpt_mem 0 GiB keeps only the newest resumable checkpoint; HF ones at every save step
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step2_hf", "global_step4_hf", "global_step6", "global_step6_hf", "latest"]
    assert (ckpt / "global_step4_hf" / "model.safetensors").is_file()
    try:
        _run_sft(tiny_ckpt, tmp_path, "nods", "--max_epochs", "1", "--save_steps", "1", "--disable_ds_ckpt", "--full_determinism")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: leave the other tests as they were
    assert not (tmp_path / "nods" / "ckpt").exists()


def test_adam_offload_gives_the_same_weights(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    _run_sft(tiny_ckpt, tmp_path, "plain", "--max_epochs", "3", "--max_samples", "4", "--lr_warmup_ratio", "0")
    _run_sft(tiny_ckpt, tmp_path, "offload", "--max_epochs", "3", "--max_samples", "4", "--lr_warmup_ratio", "0", "--adam_offload")
    plain, offload = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "offload" / "model.safetensors")
    base = load_file(tiny_ckpt / "model.safetensors")
    for name in plain:
        torch.testing.assert_close(offload[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(plain["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_config_fields_all_have_help_and_groups():
    for f in TrainConfig.__dataclass_fields__.values():
        assert f.metadata["help"] and f.metadata["group"], f.name
