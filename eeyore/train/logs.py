"""Where a run's metrics go: `<save_path>/train_log.jsonl` always, wandb and TensorBoard on request.

Only rank 0 writes. Every record (one per optimizer step, one per evaluation) is a line of the
JSONL log; every `logging_steps`-th step and every evaluation also go to wandb / TensorBoard.
On resume the log keeps its lines up to the checkpoint's step, so it reads as one run.
What trackers receive as the run's config is `TrainConfig.public()`: never the wandb key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, config: Any, enabled: bool) -> None:
        self.config, self.enabled = config, enabled
        self.path = Path(config.save_path) / "train_log.jsonl"
        self.wandb = self.tensorboard = None

    def open(self, resumed_step: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if self.config.use_wandb:
            self._open_wandb()
        if self.config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(self.config.use_tensorboard)

    def _open_wandb(self) -> None:
        cfg = self.config
        try:
            import wandb
        except ImportError:
            print("warning: --use_wandb given but wandb is not installed; logging to train_log.jsonl only")
            return
        if cfg.use_wandb.lower() not in ("true", "1"):
            wandb.login(key=cfg.use_wandb)
        self.wandb = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_org, group=cfg.wandb_group, name=cfg.wandb_run_name, config=cfg.public()
        )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": N, ...}); trackers get it on logging steps and for evaluations."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        if step % self.config.logging_steps and not any(k.startswith("eval_") for k in record):
            return
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(f"{'eval' if k.startswith('eval_') else 'train'}/{k.removeprefix('eval_')}", v, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
