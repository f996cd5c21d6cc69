"""The training core that SFT and DPO share.

How a recipe plugs in (see `sft.py` for a complete one):

1. Its CLI builds a parser with `add_common_args(parser, recipe="dpo", ...)` (the flags both
   scripts accept, with the recipe's OpenRLHF defaults) and adds its own flags.
2. It calls `d = init_distributed()` and `model = load_sharded(args.pretrain, d, ...)`
   (`parallel.py`): an FSDP2 model with fp32 master weights whose `hidden_states` is an FSDP
   forward method. A frozen reference model (DPO) loads the same way and is never given to the
   optimizer.
3. It turns rows (`data.load_rows`) into a list of examples of any type (on every rank: the
   same list everywhere), and implements `Recipe`:
     `collate(examples) -> batch`   a batch object with `.to(device)` and `.tokens` (int: real,
                                    non-padding tokens, for throughput);
     `loss(model, batch) -> (loss, metrics)`  the micro-batch objective (a scalar, already a mean
                                    over whatever the recipe averages) and detached scalar
                                    tensors to log; called under no_grad for evaluation;
     `state_dict()` / `load_state_dict()`  optional extra state kept in checkpoints.
4. `Trainer(args, d, model, tokenizer, recipe, train, eval).fit()` does the rest: distributed
   sampling (seeded, reshuffled per epoch, drop_last), gradient accumulation up to
   `train_batch_size`, AdamW with decoupled weight decay off norms and biases, warmup + cosine to
   10 %, clipping, the tqdm bar, `<save_path>/train_log.jsonl`, wandb, evaluation, resumable
   checkpoints and the final HF checkpoint.

Logged values are means over every micro-batch of the step on every rank: `loss` and each
metric the recipe returns (eval lines carry them with an `eval_` prefix).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from eeyore.model.weights import save_checkpoint

from . import checkpoint
from .parallel import Dist, full_state_dict, reshard

MIN_LR_RATIO = 0.1  # OpenRLHF's cosine_with_min_lr ends at 10 % of the peak rate
KILL_ENV = "EEYORE_TEST_KILL_AT_STEP"  # tests: SIGKILL this process right after that optimizer step


def add_common_args(parser: argparse.ArgumentParser, recipe: str, max_len: int, learning_rate: float, max_epochs: int) -> None:
    """The flags SFT and DPO share, with OpenRLHF's meanings; defaults that differ are the recipe's."""
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--pretrain", default=None,
        help="checkpoint folder or hub id in the local HF cache; none: the embedded demo model",
    )
    g.add_argument(
        "--dataset", required=True,
        help=(
            "training data: .jsonl/.json/.parquet file, a folder of them (hub snapshot or "
            "datasets.save_to_disk layout), or a hub id in the local HF cache"
        ),
    )
    g.add_argument("--dataset_split", default="train", help="split of --dataset to train on")
    g.add_argument(
        "--eval_dataset", default=None,
        help="evaluation data, same forms as --dataset; none: no evaluation",
    )
    g.add_argument("--eval_split", default="train", help="split of --eval_dataset to evaluate on")
    g.add_argument("--max_samples", type=int, default=100_000_000, help="use only the first N records of each dataset")
    g.add_argument(
        "--max_len", type=int, default=max_len,
        help=(
            "maximum tokens per sequence: longer ones are cut and end with eos; records whose prompt "
            "has >= max_len-2 tokens are dropped"
        ),
    )
    g.add_argument(
        "--apply_chat_template", action="store_true",
        help="render message lists with the chat template (else records hold plain strings)",
    )
    g.add_argument(
        "--tokenizer_chat_template", default=None,
        help=(
            "chat template replacing the tokenizer's own: a name ('llama3': the reference's), a .jinja "
            "file or jinja source; saved with the final model"
        ),
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--train_batch_size", type=int, default=128,
        help="global batch: sequences per optimizer step over all ranks",
    )
    g.add_argument(
        "--micro_train_batch_size", type=int, default=8,
        help=(
            "sequences per forward on one rank; gradients accumulate over train_batch_size / (micro * "
            "world) forwards"
        ),
    )
    g.add_argument("--max_epochs", type=int, default=max_epochs, help="passes over the training data")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help="peak learning rate")
    g.add_argument(
        "--lr_warmup_ratio", type=float, default=0.03,
        help="linear warmup over ceil(ratio * total steps), then cosine down to 10%% of the peak",
    )
    g.add_argument("--l2", type=float, default=0.0, help="AdamW decoupled weight decay (not on norm weights or biases)")
    g.add_argument(
        "--adam_betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"),
        help="AdamW betas",
    )
    g.add_argument(
        "--max_norm", type=float, default=1.0,
        help="clip the global gradient norm to this (logged before clipping)",
    )
    g.add_argument("--seed", type=int, default=42, help="seed of the data order and of torch")

    g = parser.add_argument_group("parallelism and precision")
    g.add_argument(
        "--zero_stage", type=int, default=2, choices=(0, 1, 2, 3),
        help=(
            "what FSDP2 shards, as DeepSpeed's ZeRO stages: 3 parameters+gradients+optimizer state "
            "(parameters re-gathered in backward); 2 gradients+optimizer state (gathered parameters "
            "kept from forward to backward); 0/1 nothing (replicated, gradients all-reduced)"
        ),
    )
    g.add_argument(
        "--bf16", action="store_true",
        help=(
            "bf16 compute with fp32 master weights, fp32 gradient reduction and fp32 loss; the final "
            "model is saved in bf16"
        ),
    )
    g.add_argument(
        "--flash_attn", action="store_true",
        help=(
            "accepted for compatibility: attention always uses PyTorch's fused "
            "scaled_dot_product_attention (flash kernels on CUDA)"
        ),
    )
    g.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="recompute each block's activations in backward to save memory",
    )

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--save_path", default="./ckpt", help="where the final HF checkpoint and train_log.jsonl go")
    g.add_argument("--ckpt_path", default=f"./ckpt/checkpoints_{recipe}", help="where resumable checkpoints go")
    g.add_argument(
        "--save_steps", type=int, default=-1,
        help="write a resumable checkpoint every N optimizer steps (-1: never)",
    )
    g.add_argument("--max_ckpt_num", type=int, default=3, help="keep only the newest N resumable checkpoints")
    g.add_argument(
        "--load_checkpoint", action="store_true",
        help="resume from the newest checkpoint in --ckpt_path when there is one",
    )
    g.add_argument(
        "--logging_steps", type=int, default=1,
        help="send metrics to wandb every N steps (train_log.jsonl gets every step)",
    )
    g.add_argument("--eval_steps", type=int, default=-1, help="evaluate every N steps (-1: at the end of each epoch)")
    g.add_argument(
        "--use_wandb", default=None, metavar="KEY",
        help=(
            "log to Weights & Biases (the API key, or 'True' when already logged in); ignored with a "
            "warning when wandb is not installed"
        ),
    )
    g.add_argument("--wandb_project", default=f"eeyore_train_{recipe}", help="wandb project")
    g.add_argument("--wandb_run_name", default=None, help="wandb run name")


class Batch(Protocol):
    tokens: int

    def to(self, device: torch.device) -> "Batch": ...


class Recipe(Protocol):
    def collate(self, examples: list[Any]) -> Batch: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW whose decoupled weight decay spares norm weights and biases (embeddings and head decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or name.endswith("norm.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per tensor instead of ~10 ops (several times faster on CPU with DTensors)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8, fused=True)


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float = MIN_LR_RATIO):
    """Multiplier of the peak rate for the update after `step` updates (HF's cosine_with_min_lr)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over all ranks' shards (returned before clipping), then clip in place."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # partial norms of sharded gradients: reduce them
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _mean_over_ranks(values: dict[str, torch.Tensor], count: int, device: torch.device) -> dict[str, float]:
    """Sum of per-micro-batch values over all ranks / (count micro-batches * world): a global mean."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().to(device) for v in values.values()])
    dist.all_reduce(stacked)
    total = count * dist.get_world_size()
    return {k: v / total for k, v in zip(values, stacked.tolist())}


class Trainer:
    def __init__(
        self, args: argparse.Namespace, d: Dist, model: torch.nn.Module, tokenizer: Any,
        recipe: Recipe, train: Sequence[Any], eval: Sequence[Any] | None = None,
    ) -> None:
        self.args, self.d, self.model, self.tokenizer, self.recipe = args, d, model, tokenizer, recipe
        self.train, self.eval = train, eval
        per_step = args.micro_train_batch_size * d.world_size
        if args.train_batch_size % per_step:
            raise ValueError(
                f"--train_batch_size {args.train_batch_size} must be a multiple of "
                f"--micro_train_batch_size {args.micro_train_batch_size} x {d.world_size} ranks"
            )
        self.accum = args.train_batch_size // per_step
        self.steps_per_epoch = len(train) // args.train_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train)} training examples do not fill one batch of --train_batch_size {args.train_batch_size}")
        self.total_steps = self.steps_per_epoch * args.max_epochs
        self.eval_steps = args.eval_steps if args.eval_steps > 0 else self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, args.learning_rate, args.l2, args.adam_betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, args.lr_warmup_ratio))
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.save_path = Path(args.save_path)
        self.log_path = self.save_path / "train_log.jsonl"
        self.wandb = None

    # -- data order -------------------------------------------------------------------------

    def _micro_batches(self, data: Sequence[Any], epoch: int, shuffle: bool) -> list[list[int]]:
        """This rank's micro-batches (example indices) for one pass, as a DistributedSampler deals them."""
        sampler = DistributedSampler(
            data, num_replicas=self.d.world_size, rank=self.d.rank, shuffle=shuffle, seed=self.args.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        order, size = list(sampler), self.args.micro_train_batch_size
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> None:
        args = self.args
        if args.load_checkpoint:
            self._resume()
        self._open_logs()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.d.is_main, dynamic_ncols=True)
        kill_at = int(os.environ.get(KILL_ENV, 0))
        while self.epoch < args.max_epochs:
            batches = self._micro_batches(self.train, self.epoch, shuffle=True)
            while self.step_in_epoch < self.steps_per_epoch:
                first = self.step_in_epoch * self.accum
                record = self.train_step([self.recipe.collate([self.train[i] for i in b]) for b in batches[first : first + self.accum]])
                self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
                self._log({"step": self.step, "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.eval and self.step % self.eval_steps == 0:
                    self.evaluate()
                if args.save_steps > 0 and self.step % args.save_steps == 0:
                    self._save_checkpoint()
                if self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        bar.close()
        self.save_model()
        if self.wandb is not None:
            self.wandb.finish()

    def train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """One optimizer step over `micro_batches`; returns the step's global means and rates."""
        start = time.perf_counter()
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        for batch in micro_batches:
            loss, metrics = self.recipe.loss(self.model, batch.to(self.d.device))
            (loss / len(micro_batches)).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            tokens += batch.tokens
        grad_norm = clip_grad_norm(self.params, self.args.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = _mean_over_ranks({**sums, "tokens": torch.tensor(float(tokens))}, len(micro_batches), self.d.device)
        total_tokens = means.pop("tokens") * len(micro_batches) * self.d.world_size
        return {**means, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": total_tokens / (time.perf_counter() - start)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = self._micro_batches(self.eval, 0, shuffle=False)
        for idx in tqdm(batches, desc="eval", leave=False, disable=not self.d.is_main):
            loss, metrics = self.recipe.loss(self.model, self.recipe.collate([self.eval[i] for i in idx]).to(self.d.device))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0) + v.float()
        reshard(self.model)
        if not batches:
            if self.d.is_main:
                print(f"warning: the eval set ({len(self.eval)} examples) fills no micro-batch on {self.d.world_size} ranks; skipped")
            return {}
        means = {f"eval_{k}": v for k, v in _mean_over_ranks(sums, len(batches), self.d.device).items()}
        self._log({"step": self.step, "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, **means})
        return means

    # -- logs, checkpoints, final model --------------------------------------------------------

    def _open_logs(self) -> None:
        if not self.d.is_main:
            return
        self.save_path.mkdir(parents=True, exist_ok=True)
        # On resume keep the lines up to the checkpoint: the log then reads as one uninterrupted run.
        kept = []
        if self.step and self.log_path.is_file():
            kept = [line for line in self.log_path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        self.log_path.write_text("".join(line + "\n" for line in kept))
        if self.args.use_wandb:
            try:
                import wandb
            except ImportError:
                print("warning: --use_wandb given but wandb is not installed; logging to train_log.jsonl only")
                return
            if self.args.use_wandb.lower() not in ("true", "1"):
                wandb.login(key=self.args.use_wandb)
            self.wandb = wandb.init(project=self.args.wandb_project, name=self.args.wandb_run_name, config=vars(self.args))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.d.is_main:
            return
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None and (self.step % self.args.logging_steps == 0 or any(k.startswith("eval_") for k in record)):
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=self.step)

    @functools.cached_property
    def run_facts(self) -> dict[str, Any]:
        """What decides this run's loss curve: a checkpoint must share it to be resumed (checkpoint.check_run)."""
        args = self.args
        return {
            "train_examples": len(self.train), "train_data": checkpoint.data_digest(self.train),
            "train_batch_size": args.train_batch_size, "seed": args.seed, "max_epochs": args.max_epochs,
            "total_steps": self.total_steps, "warmup_steps": math.ceil(self.total_steps * args.lr_warmup_ratio),
            "lr_scheduler": getattr(args, "lr_scheduler", "cosine_with_min_lr"), "learning_rate": args.learning_rate,
        }

    def _trainer_state(self) -> dict[str, Any]:
        recipe_state = self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else {}
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "scheduler": self.scheduler.state_dict(), "recipe": recipe_state, **self.run_facts,
        }

    def _save_checkpoint(self) -> None:
        checkpoint.save(self.args.ckpt_path, self.step, self.model, self.optimizer, self._trainer_state(), self.d, self.args.max_ckpt_num)

    def _resume(self) -> None:
        found = checkpoint.resume(self.args.ckpt_path, self.model, self.optimizer, self.d, self.run_facts)
        if found is None:
            if self.d.is_main:
                print(f"--load_checkpoint: no checkpoint in {self.args.ckpt_path}; starting from the pretrained model")
            return
        path, state = found
        self.scheduler.load_state_dict(state["scheduler"])
        if hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(state["recipe"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.d.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} in it)")

    def save_model(self) -> None:
        """The final HF checkpoint in `--save_path`: safetensors, configs and the tokenizer with its template."""
        state = full_state_dict(self.model)
        if self.d.is_main:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float32
            state = {k: v.to(dtype) for k, v in state.items()}
            save_checkpoint(self.save_path, state, self.model.config, self.tokenizer, self.model.generation_config or None)
        self.d.barrier()
