"""The training core that SFT and DPO share.

How a recipe plugs in (see `sft.py` for a complete one):

1. Its CLI parses the command line into a typed config (`config.TrainConfig` plus the recipe's
   fields, via `flags.parse_config`) and calls `d = start_run(config)`.
2. It loads the model with `load_sharded(config.pretrain, d, ..., lora=lora_spec(config))`
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
4. `Trainer(config, d, model, tokenizer, recipe, train, eval).fit()` does the rest: distributed
   sampling (seeded, reshuffled per epoch, drop_last), gradient accumulation up to
   `train_batch_size`, AdamW and the schedule (`optim.py`), clipping, the tqdm bar, the logs
   (`logs.py`), evaluation, resumable checkpoints and the final HF checkpoint (with LoRA: merged,
   plus the adapter alone).

Logged values are means over every micro-batch of the step on every rank: `loss` and each
metric the recipe returns (eval lines carry them with an `eval_` prefix).

Which tokens are trained: SFT marks them with `labels` (the token itself, or IGNORE_INDEX) and
its collate shifts them into next-token `targets`; DPO keeps a `prompt_len` per pair and its loss
shifts a response mask. The two conventions give the same tokens (the response, the end token
included) and stay separate for now: unifying them changes both recipes' data paths at once.

Code that watches a run from outside the loop (a profiler, the tests' kill switch) appends a
callable to `STEP_END_CALLBACKS`; each is called with the trainer after every optimizer step.
"""
from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from eeyore.model import linear as products
from eeyore.model.weights import save_checkpoint

from . import checkpoint
from .logs import RunLog
from .loss import use_kernels
from .lora import LoRASpec, save_adapter, split_merged
from .optim import build_optimizer, clip_grad_norm, lr_factor
from .parallel import Dist, full_state_dict, init_distributed, reshard

STEP_END_CALLBACKS: list[Callable[["Trainer"], None]] = []


class Batch(Protocol):
    tokens: int

    def to(self, device: torch.device) -> "Batch": ...


class Recipe(Protocol):
    def collate(self, examples: list[Any]) -> Batch: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def start_run(config: Any) -> Dist:
    """Join the process group and seed torch; with --full_determinism only deterministic kernels."""
    if config.full_determinism:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
    d = init_distributed()
    torch.manual_seed(config.seed)
    use_kernels(config.kernels)  # the fused Triton loss under --kernels on (auto: on CUDA)
    return d


def lora_spec(config: Any) -> LoRASpec | None:
    if not config.lora_rank:
        return None
    return LoRASpec(config.lora_rank, config.lora_alpha, config.lora_dropout, config.adapted_modules, config.seed)


def compile_blocks(model: torch.nn.Module) -> None:
    """--deepcompile: torch.compile each block's computation (FSDP2's hooks stay outside it)."""
    for block in model.model.layers:
        block.forward = torch.compile(block.forward)


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
        self, config: Any, d: Dist, model: torch.nn.Module, tokenizer: Any,
        recipe: Recipe, train: Sequence[Any], eval: Sequence[Any] | None = None,
    ) -> None:
        self.config, self.d, self.model, self.tokenizer, self.recipe = config, d, model, tokenizer, recipe
        self.train, self.eval = train, eval
        per_step = config.micro_train_batch_size * d.world_size
        if config.train_batch_size % per_step:
            raise ValueError(
                f"--train_batch_size {config.train_batch_size} must be a multiple of "
                f"--micro_train_batch_size {config.micro_train_batch_size} x {d.world_size} ranks"
            )
        self.accum = config.train_batch_size // per_step
        self.steps_per_epoch = len(train) // config.train_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train)} training examples do not fill one batch of --train_batch_size {config.train_batch_size}")
        self.total_steps = self.steps_per_epoch * config.max_epochs
        self.eval_steps = config.eval_steps if config.eval_steps > 0 else self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, config.learning_rate, config.l2, config.adam_betas)
        self.lr_factor = lr_factor(config.lr_scheduler, self.total_steps, config.lr_warmup_ratio, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.save_path = Path(config.save_path)
        self.log = RunLog(config, enabled=d.is_main)
        self.lora = lora_spec(config)
        self._agree_on_products()
        if config.deepcompile:
            compile_blocks(model)

    # -- data order -------------------------------------------------------------------------

    def _micro_batches(self, data: Sequence[Any], epoch: int, shuffle: bool) -> list[list[int]]:
        """This rank's micro-batches (example indices) for one pass, as a DistributedSampler deals them."""
        sampler = DistributedSampler(
            data, num_replicas=self.d.world_size, rank=self.d.rank, shuffle=shuffle, seed=self.config.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        order, size = list(sampler), self.config.micro_train_batch_size
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.config
        if cfg.load_checkpoint:
            self._resume()
        self.log.open(self.step)
        self._warn_if_nothing_learns()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.d.is_main, dynamic_ncols=True)
        while self.epoch < cfg.max_epochs:
            batches = self._micro_batches(self.train, self.epoch, shuffle=True)
            while self.step_in_epoch < self.steps_per_epoch:
                first = self.step_in_epoch * self.accum
                record = self.train_step([self.recipe.collate([self.train[i] for i in b]) for b in batches[first : first + self.accum]])
                self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
                self.log.write({"step": self.step, "epoch": self._epoch_progress(), **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.eval and self.step % self.eval_steps == 0:
                    self.evaluate()
                if cfg.save_steps > 0 and self.step % cfg.save_steps == 0:
                    self._save_checkpoint()
                for callback in STEP_END_CALLBACKS:
                    callback(self)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        bar.close()
        self.save_model(self.save_path)
        self.log.close()
        self._warn_if_nothing_learns()
        if self.d.is_main:
            print(f"model saved to {self.save_path.resolve()}" + (f" (LoRA adapter alone: {self.save_path.resolve() / 'adapter'})" if self.lora else ""))

    def _epoch_progress(self) -> float:
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def _warn_if_nothing_learns(self) -> None:
        """Say so when every update of the run falls in the warmup at learning rate 0."""
        if self.d.is_main and all(self.lr_factor(s) == 0 for s in range(self.total_steps)):
            print(
                f"warning: all {self.total_steps} optimizer step(s) fall in the warmup and run at learning rate 0, "
                f"so the saved weights equal the starting model: add data or epochs, or lower --lr_warmup_ratio "
                f"({self.config.lr_warmup_ratio})"
            )

    def train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """One optimizer step over `micro_batches`; returns the step's global means and rates."""
        start = time.perf_counter()
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        for i, batch in enumerate(micro_batches):
            self._gradient_sync(i == len(micro_batches) - 1)
            loss, metrics = self.recipe.loss(self.model, batch.to(self.d.device))
            (loss / len(micro_batches)).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            tokens += batch.tokens
        grad_norm = clip_grad_norm(self.params, self.config.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = _mean_over_ranks({**sums, "tokens": torch.tensor(float(tokens))}, len(micro_batches), self.d.device)
        total_tokens = means.pop("tokens") * len(micro_batches) * self.d.world_size
        return {**means, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": total_tokens / (time.perf_counter() - start)}

    def _gradient_sync(self, on: bool) -> None:
        """Reduce gradients across ranks only in the step's last backward (fewer collectives).

        Not under ZeRO-3: skipping keeps every rank's unsharded fp32 gradients until the last
        micro-batch, the memory that stage exists to save.
        """
        if isinstance(self.model, FSDPModule) and self.config.zero_stage < 3:
            self.model.set_requires_gradient_sync(on)

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
        self.log.write({"step": self.step, "epoch": self._epoch_progress(), **means})
        return means

    # -- checkpoints and the final model -------------------------------------------------------

    @functools.cached_property
    def run_facts(self) -> dict[str, Any]:
        """What decides this run's loss curve: a checkpoint must share it to be resumed (checkpoint.check_run)."""
        cfg = self.config
        return {
            "train_examples": len(self.train), "train_data": checkpoint.data_digest(self.train),
            "train_batch_size": cfg.train_batch_size, "seed": cfg.seed, "max_epochs": cfg.max_epochs,
            "total_steps": self.total_steps, "warmup_steps": math.ceil(self.total_steps * cfg.lr_warmup_ratio),
            "lr_scheduler": cfg.lr_scheduler, "min_lr_ratio": cfg.min_lr_ratio, "learning_rate": cfg.learning_rate,
        }

    def _trainer_state(self) -> dict[str, Any]:
        recipe_state = self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else {}
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "scheduler": self.scheduler.state_dict(), "recipe": recipe_state, **self.run_facts,
            "cpu_products": products.chosen(),  # a resumed run rounds as this one did
        }

    def _agree_on_products(self) -> None:
        """Every rank computes with rank 0's measured CPU products (--cpu_matmul auto measures on
        each rank, and two products round differently), so the ranks' gradients stay alike."""
        if dist.is_initialized() and self.d.world_size > 1:
            choice = [products.chosen()]
            dist.broadcast_object_list(choice, src=0)
            products.use(**choice[0])

    def _save_checkpoint(self) -> None:
        cfg = self.config
        if not cfg.disable_ds_ckpt:
            checkpoint.save(cfg.ckpt_path, self.step, self.model, self.optimizer, self._trainer_state(), self.d, cfg.max_ckpt_num, cfg.max_ckpt_mem * 2**30)
        if cfg.save_hf_ckpt:
            self.save_model(Path(cfg.ckpt_path) / f"global_step{self.step}_hf")

    def _resume(self) -> None:
        found = checkpoint.resume(self.config.ckpt_path, self.model, self.optimizer, self.d, self.run_facts)
        if found is None:
            if self.d.is_main:
                print(f"--load_checkpoint: no checkpoint in {self.config.ckpt_path}; starting from the pretrained model")
            return
        path, state = found
        self.scheduler.load_state_dict(state["scheduler"])
        if self.config.cpu_matmul == "auto" and "cpu_products" in state:
            products.use(**state["cpu_products"])  # measured anew it might pick another product
        if hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(state["recipe"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.d.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} in it)")

    def save_model(self, out_dir: Path) -> None:
        """An HF checkpoint in `out_dir`: safetensors, configs and the tokenizer with its template.

        With LoRA the adapters are merged into the weights, and the adapter alone is also saved in
        PEFT's layout in `out_dir/adapter`.
        """
        state = full_state_dict(self.model)
        if self.d.is_main:
            adapter = None
            if self.lora is not None:
                state, adapter = split_merged(state, self.lora)
            dtype = torch.bfloat16 if self.config.bf16 else torch.float32
            state = {k: v.to(dtype) for k, v in state.items()}
            save_checkpoint(out_dir, state, self.model.config, self.tokenizer, self.model.generation_config or None)
            if adapter is not None:
                save_adapter(out_dir / "adapter", {k: v.to(dtype) for k, v in adapter.items()}, self.lora, self.model.name_or_path)
        self.d.barrier()
