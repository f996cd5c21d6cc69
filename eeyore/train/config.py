"""One typed configuration per training run: `TrainConfig`, shared by SFT and DPO.

Each field is one command-line flag with OpenRLHF's name and meaning; its default and help text
live here only (`flags.py` builds the parser from these fields, so `--help` and the code cannot
disagree). `SFTConfig` and `DPOConfig` add their recipe's fields and change the defaults that
OpenRLHF's two scripts set differently (`recipe_default`).

The wandb API key (`use_wandb`) is a secret: it is left out of `repr` and of `public()`, which is
what gets written into logs and experiment trackers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")
ALL_LINEAR = "all-linear"  # PEFT's name for every projection of every block (not the lm_head)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def flag(default: Any, help: str, group: str, **argparse_kwargs: Any) -> Any:
    """A config field that is also a flag; extra keywords go to `add_argument` (choices, nargs...)."""
    secret = argparse_kwargs.pop("secret", False)
    meta = {"help": help, "group": group, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, repr=not secret)


DATA, OPTIM, LORA, PARALLEL, LOGS = "model and data", "optimisation", "LoRA", "parallelism, precision and speed", "logging and checkpoints"


@dataclass
class TrainConfig:
    # -- model and data ---------------------------------------------------------------------
    pretrain: str | None = flag(None, "checkpoint folder or hub id in the local HF cache; none: the embedded demo model", DATA)
    dataset: str = flag("", "training data, comma-separated for several: .jsonl/.json/.parquet files, folders of them (hub snapshot or datasets.save_to_disk layout), or hub ids in the local HF cache", DATA, required=True)
    dataset_probs: str | None = flag(None, "with several --dataset: comma-separated sampling probabilities; rows are interleaved in an order fixed by --seed until every dataset has been used up at least once (none: the datasets are concatenated)", DATA)
    dataset_split: str = flag("train", "split of --dataset to train on", DATA)
    train_split: str | None = flag(None, "older name of --dataset_split (OpenRLHF keeps both); when given it wins", DATA)
    eval_dataset: str | None = flag(None, "evaluation data, same forms as --dataset (comma-separated ones are concatenated); none: no evaluation", DATA)
    eval_split: str = flag("train", "split of --eval_dataset to evaluate on", DATA)
    max_samples: int = flag(100_000_000, "use only the first N records of each dataset", DATA)
    max_len: int = flag(2048, "maximum tokens per sequence: longer ones are cut and end with eos; records whose prompt has >= max_len-2 tokens are dropped", DATA)
    apply_chat_template: bool = flag(False, "render message lists with the chat template (else records hold plain strings)", DATA)
    tokenizer_chat_template: str | None = flag(None, "chat template replacing the tokenizer's own: a name ('llama3': the reference's), a .jinja file or jinja source; saved with the final model", DATA)
    input_template: str | None = flag(None, "without --apply_chat_template: a format string the prompt text goes through, e.g. 'User: {}\\nAssistant: ' (OpenRLHF's SFT default; none here: the text as it is)", DATA)
    pretrain_mode: bool = flag(False, "loss on every token of a record (prompt included), as in pre-training; plain-text records may then have no --output_key", DATA)

    # -- optimisation -----------------------------------------------------------------------
    train_batch_size: int = flag(128, "global batch: sequences per optimizer step over all ranks", OPTIM)
    micro_train_batch_size: int = flag(8, "sequences per forward on one rank; gradients accumulate over train_batch_size / (micro * world) forwards", OPTIM)
    max_epochs: int = flag(2, "passes over the training data", OPTIM)
    learning_rate: float = flag(5e-6, "peak learning rate", OPTIM)
    lr_scheduler: str = flag("cosine_with_min_lr", "learning-rate schedule after the warmup, as transformers' get_scheduler names them: cosine_with_min_lr (cosine down to --min_lr_ratio of the peak), cosine (down to 0), linear (down to 0), constant (no warmup either), constant_with_warmup", OPTIM, choices=SCHEDULERS)
    lr_warmup_ratio: float = flag(0.03, "linear warmup from 0 over ceil(ratio * total steps) steps", OPTIM)
    min_lr_ratio: float = flag(0.1, "cosine_with_min_lr ends at this fraction of the peak rate (OpenRLHF fixes it at 0.1)", OPTIM)
    l2: float = flag(0.0, "AdamW decoupled weight decay (not on norm weights or biases)", OPTIM)
    adam_betas: tuple = flag((0.9, 0.95), "AdamW betas", OPTIM, nargs=2, type=float, metavar=("BETA1", "BETA2"))
    max_norm: float = flag(1.0, "clip the global gradient norm to this (logged before clipping)", OPTIM)
    seed: int = flag(42, "seed of the data order, the dataset mixing, the LoRA initialisation and torch", OPTIM)
    full_determinism: bool = flag(False, "deterministic kernels only (torch.use_deterministic_algorithms; on CUDA also cuBLAS's fixed workspace): slower, bitwise repeatable", OPTIM)
    adam_offload: bool = flag(False, "keep the optimizer state, master weights and gradients on the CPU and run the AdamW update there (FSDP2's CPUOffloadPolicy): fits larger models on fewer GPUs, same updates", OPTIM)

    # -- LoRA -------------------------------------------------------------------------------
    lora_rank: int = flag(0, "train low-rank adapters of this rank on --target_modules instead of every weight (0: full fine-tuning); the base stays frozen", LORA)
    lora_alpha: int = flag(16, "adapter scale: the update is (lora_alpha / lora_rank) * B @ A", LORA)
    lora_dropout: float = flag(0.0, "dropout on the adapters' input during training", LORA)
    target_modules: list = flag([ALL_LINEAR], f"projections that get adapters: {', '.join(PROJECTIONS)}, or {ALL_LINEAR} (all of them)", LORA, nargs="*", metavar="NAME")

    # -- parallelism, precision, speed --------------------------------------------------------
    zero_stage: int = flag(2, "what FSDP2 shards, as DeepSpeed's ZeRO stages: 3 parameters+gradients+optimizer state (parameters re-gathered in backward); 2 gradients+optimizer state (gathered parameters kept from forward to backward); 0/1 nothing (replicated, gradients all-reduced)", PARALLEL, choices=(0, 1, 2, 3))
    bf16: bool = flag(False, "bf16 compute with fp32 master weights, fp32 gradient reduction and fp32 loss; the final model is saved in bf16", PARALLEL)
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in backward to save memory", PARALLEL)
    packing_samples: bool = flag(False, "pack the sequences of a micro-batch into one row without padding (attention kept within each sequence)", PARALLEL)
    kernels: str = flag("off", "this project's fused kernels in training (on: swapped in from outside the model's readable module)", PARALLEL, choices=("off", "on"))
    use_liger_kernel: bool = flag(False, "mapped to --kernels on (this project's fused kernels take the place of Liger's)", PARALLEL)
    deepcompile: bool = flag(False, "mapped to torch.compile: each decoder block is compiled (DeepSpeed's DeepCompile has no FSDP2 form)", PARALLEL)

    # -- logging and checkpoints --------------------------------------------------------------
    save_path: str = flag("./ckpt", "where the final HF checkpoint and train_log.jsonl go (with LoRA: the merged model, and the adapter alone in <save_path>/adapter)", LOGS)
    ckpt_path: str = flag("./ckpt/checkpoints_sft", "where resumable checkpoints go", LOGS)
    save_steps: int = flag(-1, "write a checkpoint every N optimizer steps (-1: never)", LOGS)
    save_hf_ckpt: bool = flag(False, "at each --save_steps also write an HF checkpoint to <ckpt_path>/global_step<N>_hf", LOGS)
    disable_ds_ckpt: bool = flag(False, "at each --save_steps write no resumable checkpoint (only the HF one of --save_hf_ckpt)", LOGS)
    max_ckpt_num: int = flag(3, "keep only the newest N resumable checkpoints", LOGS)
    max_ckpt_mem: int = flag(100_000_000, "and only as many of the newest as fit in this many GiB (the newest is always kept)", LOGS)
    load_checkpoint: bool = flag(False, "resume from the newest checkpoint in --ckpt_path when there is one", LOGS)
    logging_steps: int = flag(1, "send metrics to wandb/tensorboard every N steps (train_log.jsonl gets every step)", LOGS)
    eval_steps: int = flag(-1, "evaluate every N steps (-1: at the end of each epoch)", LOGS)
    use_wandb: str | None = flag(None, "log to Weights & Biases: the API key, or 'True' when already logged in (the key is never written to any log or config); ignored with a warning when wandb is not installed", LOGS, metavar="KEY", secret=True)
    wandb_org: str | None = flag(None, "wandb entity (team or user) the run belongs to", LOGS)
    wandb_group: str | None = flag(None, "wandb group of the run", LOGS)
    wandb_project: str = flag("eeyore_train_sft", "wandb project", LOGS)
    wandb_run_name: str | None = flag(None, "wandb run name", LOGS)
    use_tensorboard: str | None = flag(None, "also write the logged scalars as TensorBoard event files under this folder (needs the tensorboard package)", LOGS, metavar="DIR")

    def public(self) -> dict[str, Any]:
        """Every field as plain values, fit for a log or a tracker: the wandb key is not among them."""
        out = dataclasses.asdict(self)
        out["use_wandb"] = self.use_wandb is not None
        return out

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def adapted_modules(self) -> tuple[str, ...]:
        return PROJECTIONS if ALL_LINEAR in self.target_modules else tuple(self.target_modules)


def recipe_default(name: str, value: Any) -> Any:
    """`TrainConfig`'s field `name` with another default (a recipe's OpenRLHF default)."""
    base = TrainConfig.__dataclass_fields__[name]
    return field(default=value, metadata=base.metadata, repr=base.repr)


def from_namespace(cls: type, namespace: Any) -> Any:
    """An instance of config class `cls` from an argparse namespace (extra attributes are ignored)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)})
