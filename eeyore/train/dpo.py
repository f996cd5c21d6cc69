"""DPO on the shared trainer core: `torchrun --nproc_per_node=N -m eeyore.train.dpo ...`.

Accepts every flag of OpenRLHF's train_dpo with the same meanings (`DPOConfig`: the shared
flags plus the objective and the record fields; `flags.py` answers the DeepSpeed-only ones). The loop itself is `trainer.Trainer`; this file is the recipe:
chosen and rejected go through one concatenated forward, their summed response log-probs feed
`dpo_loss.preference_loss`.

The reference model never trains and never enters the optimizer. Two ways to run it:
- default: it stays resident, sharded like ZeRO-3 whatever `--zero_stage` (it only runs
  forward, so gathering one block at a time costs little), and runs each micro-batch under
  no_grad;
- `--ref_offload`: its log-probs are computed once, before training, for every train and eval
  pair, and the reference is then gone: it holds no accelerator memory during training and
  costs no forward per step. Valid because its log-probs are deterministic. When
  `--ref_pretrain` is the policy's own checkpoint (the default), the policy itself computes
  them before its first update, so no second model is ever loaded; otherwise the reference is
  loaded, used and freed before the policy is loaded. A resumed run recomputes them the same
  way, before the checkpoint is restored.

With LoRA (`--lora_rank`) and the policy's own checkpoint as reference, the reference is the
policy with its adapters switched off (`lora.adapters_disabled`): the frozen base, no second model.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from eeyore.model.chat import ChatTemplate
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.fastpath import speed_up
from eeyore.model.pretrained import resolve_model_dir

from .config import TrainConfig, flag, recipe_default
from .data import data_warnings
from .dpo_data import PairBatch, PreferenceFormat, PreferencePair, build_pairs, collate_pairs, collate_pairs_packed
from .dpo_loss import DPOLossConfig, preference_loss, response_logps
from .flags import parse_config, refuse
from .lora import adapters_disabled
from .mixing import load_mixture
from .packing import model_inputs
from .parallel import Dist, launch, load_sharded, reshard
from .trainer import Trainer, lora_spec, start_run


def sequence_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and token-mean response log-probs of every row of the batch (one forward)."""
    hidden = model.hidden_states(batch.input_ids, **model_inputs(batch.packed))
    return response_logps(hidden, model.lm_head.weight, batch.targets, batch.packed)


class DPORecipe:
    """The DPO objective for `Trainer`: micro-batch in, (loss, metrics) out.

    The reference log-probs come from the batch (precomputed), from `reference`, or, with
    `base_is_reference`, from the LoRA policy itself with its adapters off.
    """

    def __init__(self, config: DPOLossConfig, pad_id: int, reference: nn.Module | None = None, base_is_reference: bool = False,
                 packing: bool = False) -> None:
        self.config, self.pad_id, self.reference, self.base_is_reference = config, pad_id, reference, base_is_reference
        self.packing = packing

    def collate(self, pairs: list[PreferencePair]) -> PairBatch:
        batch = collate_pairs_packed(pairs) if self.packing else collate_pairs(pairs, self.pad_id)
        if batch.ref_logps is None and self.reference is None and not self.base_is_reference:
            raise ValueError("no reference log-probs: precompute them (--ref_offload) or give the recipe a reference model")
        return batch

    def loss(self, model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref = batch.ref_logps
        if ref is None:  # before the policy's forward, which may be the same FSDP model
            reference = model if self.base_is_reference else self.reference
            with torch.no_grad(), adapters_disabled(reference):
                ref, _ = sequence_logps(reference, batch)
            reshard(reference)
        sums, means = sequence_logps(model, batch)
        n = batch.pairs
        out = preference_loss(sums[:n], sums[n:], ref[:n], ref[n:], self.config, means[:n])
        metrics = {
            "reward_accuracy": out.accuracy,
            "chosen_reward": out.chosen_rewards.mean(),
            "rejected_reward": out.rejected_rewards.mean(),
            "reward_margin": out.margin,
            "policy_chosen_logps": sums[:n].detach().mean(),
            "policy_rejected_logps": sums[n:].detach().mean(),
        }
        if self.config.nll_loss_coef > 0:
            metrics["preference_loss"] = out.losses.mean()
            metrics["nll_loss"] = -means[:n].detach().mean()
        return out.loss, metrics


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: list[PreferencePair], micro_batch: int, pad_id: int, d: Dist) -> None:
    """Fill `pair.ref_logps` for every pair with `model`'s summed log-probs.

    Each rank scores its own share; every rank runs the same number of forwards (a rank with
    nothing left re-scores pair 0 and discards it), because sharded forwards are collectives.
    """
    if not pairs:
        return
    model.eval()
    per_round = micro_batch * d.world_size
    found = torch.zeros(len(pairs), 2, dtype=torch.float64, device=d.device)
    rounds = math.ceil(len(pairs) / per_round)
    for k in tqdm(range(rounds), desc="reference log-probs", unit="batch", disable=not d.is_main):
        first = k * per_round + d.rank * micro_batch
        mine = list(range(first, min(first + micro_batch, len(pairs))))
        batch = collate_pairs([pairs[i] for i in mine or [0]], pad_id).to(d.device)
        sums, _ = sequence_logps(model, batch)
        n = batch.pairs
        for j, i in enumerate(mine):
            found[i, 0], found[i, 1] = sums[j], sums[n + j]
    reshard(model)
    dist.all_reduce(found)  # each pair was scored by exactly one rank
    for pair, (chosen, rejected) in zip(pairs, found.tolist()):
        pair.ref_logps = (chosen, rejected)


def load_reference(args: Any, d: Dist) -> nn.Module:
    # Frozen: under --bf16 it computes in bf16 anyway, so its shards are kept in bf16 too.
    store = torch.bfloat16 if args.bf16 else torch.float32
    model = load_sharded(args.ref_pretrain, d, zero_stage=3, bf16=args.bf16, store_dtype=store)
    model.requires_grad_(False)
    speed_up(model, args.kernels, args.cpu_matmul)
    return model.eval()


def load_tokenizer(args: Any) -> tuple[Tokenizer, ChatTemplate | None]:
    """The policy's tokenizer, with `--tokenizer_chat_template` (if any) in place so it is saved too."""
    tokenizer = Tokenizer.from_pretrained(resolve_model_dir(args.pretrain))
    if not args.apply_chat_template:
        return tokenizer, None
    template = ChatTemplate.for_tokenizer(tokenizer, args.tokenizer_chat_template)
    tokenizer.chat_template = template.source
    return tokenizer, template


def train(args: "DPOConfig", d: Dist) -> None:
    tokenizer, template = load_tokenizer(args)
    fmt = PreferenceFormat(args.prompt_key, args.chosen_key, args.rejected_key, args.apply_chat_template, args.input_template)
    datasets = {"train": (args.dataset, args.dataset_split, args.dataset_probs)}
    if args.eval_dataset:
        datasets["eval"] = (args.eval_dataset, args.eval_split, None)
    pairs: dict[str, list[PreferencePair]] = {}
    for name, (spec, split, probs) in datasets.items():
        rows = load_mixture(spec, probs, split, args.max_samples, args.seed)
        pairs[name], dropped = build_pairs(rows, tokenizer, fmt, args.max_len, template, d.is_main)
        if d.is_main:
            print(f"{name}: {len(pairs[name])} preference pairs from {spec} ({split}); dropped {dropped['too_long']} "
                  f"whose prompt has >= max_len - 2 = {args.max_len - 2} tokens and {dropped['empty_response']} "
                  f"with an empty chosen or rejected response")
            for line in data_warnings(rows, spec):
                print(line)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]
    every_pair = [p for split_pairs in pairs.values() for p in split_pairs]

    same_reference = resolve_model_dir(args.ref_pretrain) == resolve_model_dir(args.pretrain)
    reference = None
    if args.ref_offload and not same_reference:
        scorer = load_reference(args, d)
        precompute_reference(scorer, every_pair, args.micro_train_batch_size, pad_id, d)
        del scorer  # freed before the policy loads: the two never share the accelerator
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lora = lora_spec(args)
    model = load_sharded(args.pretrain, d, args.zero_stage, args.bf16, args.gradient_checkpointing, lora=lora, cpu_offload=args.adam_offload)
    speed_up(model, args.kernels, args.cpu_matmul)
    if args.ref_offload and same_reference:
        precompute_reference(model, every_pair, args.micro_train_batch_size, pad_id, d)
    base_is_reference = not args.ref_offload and same_reference and lora is not None
    if not args.ref_offload and not base_is_reference:
        reference = load_reference(args, d)

    recipe = DPORecipe(loss_config(args), pad_id, reference, base_is_reference, args.packing_samples)
    Trainer(args, d, model, tokenizer, recipe, pairs["train"], pairs.get("eval")).fit()


@dataclass
class DPOConfig(TrainConfig):
    """The DPO run: the shared flags with train_dpo's defaults, the objective and the record fields."""

    max_len: int = recipe_default("max_len", 512)
    learning_rate: float = recipe_default("learning_rate", 1e-5)
    max_epochs: int = recipe_default("max_epochs", 1)
    ckpt_path: str = recipe_default("ckpt_path", "./ckpt/checkpoints_dpo")
    wandb_project: str = recipe_default("wandb_project", "eeyore_train_dpo")
    ref_pretrain: str | None = flag(None, "reference model checkpoint (none: --pretrain; with LoRA that is the frozen base, no second model)", "DPO")
    ref_offload: bool = flag(False, "compute the reference log-probs once before training and keep no reference model during it", "DPO")
    beta: float = flag(0.1, "DPO temperature: rewards are beta * (policy - reference) log-prob", "DPO")
    label_smoothing: float = flag(0.0, "conservative DPO: the assumed probability that a pair's preference is flipped, in [0, 0.5)", "DPO")
    ipo: bool = flag(False, "use the IPO loss (z - 1/(2 beta))^2 instead of the sigmoid loss", "DPO")
    nll_loss_coef: float = flag(0.0, "weight of an added NLL term on the chosen responses (per-sequence token mean)", "DPO")
    prompt_key: str | None = flag(None, "field with the prompt (messages, or text); without it chosen/rejected are whole conversations sharing all but their last message", "record fields")
    chosen_key: str = flag("chosen", "field with the preferred response (messages or text)", "record fields")
    rejected_key: str = flag("rejected", "field with the dispreferred response (messages or text)", "record fields")


def parse_args(argv: list[str] | None = None) -> DPOConfig:
    prog = "torchrun --nproc_per_node=N -m eeyore.train.dpo"
    args = parse_config(
        DPOConfig, argv, prog,
        "Direct preference optimisation (sigmoid DPO, conservative DPO or IPO) of a Llama checkpoint on prompt / "
        "chosen / rejected records, with every flag of OpenRLHF's train_dpo and its semantics.",
    )
    args.ref_pretrain = args.ref_pretrain or args.pretrain
    if args.pretrain_mode:
        refuse(prog, "--pretrain_mode", "is an SFT flag; DPO trains on response tokens only")
    try:
        loss_config(args)
    except ValueError as e:
        refuse(prog, "--beta/--label_smoothing/--ipo", str(e))
    return args


def loss_config(args: Any) -> DPOLossConfig:
    return DPOLossConfig(args.beta, args.label_smoothing, args.ipo, args.nll_loss_coef)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with launch(lambda: start_run(args)) as d:
        train(args, d)


if __name__ == "__main__":
    main()
