"""Resumable training checkpoints: everything needed to continue a killed run exactly.

Layout under `--ckpt_path`:

    global_step12/          one complete checkpoint
        .metadata, *.distcp   model and optimizer, sharded (torch.distributed.checkpoint):
                              each rank writes its own shards; any world size can read them
        trainer.pt            step, epoch, position in the epoch, scheduler, recipe state
        rng_rank{r}.pt        each rank's RNG states
    latest                  name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place only after every rank
has finished, so a crash mid-save leaves the previous checkpoint as `latest`.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .parallel import Dist

_NAME = re.compile(r"global_step(\d+)")


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so resuming loads with `weights_only=True` (no pickles).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    ckpt_path: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any], d: Dist, keep: int, max_bytes: float = float("inf"),
) -> Path:
    """Write checkpoint `global_step{step}` atomically; keep only the newest `keep` (0: all) that
    fit in `max_bytes` together (the newest always stays)."""
    root = Path(ckpt_path)
    final, tmp = root / f"global_step{step}", root / f"global_step{step}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
    d.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        prune(root, keep, max_bytes)
    d.barrier()
    return final


def prune(root: Path, keep: int, max_bytes: float) -> None:
    """Delete the oldest complete checkpoints beyond the newest `keep` or beyond `max_bytes` in all."""
    total = 0
    for i, path in enumerate(sorted(_complete(root), key=_step, reverse=True)):
        total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if i > 0 and ((keep > 0 and i >= keep) or total > max_bytes):
            shutil.rmtree(path, ignore_errors=True)


def latest(ckpt_path: str | Path) -> Path | None:
    """The newest complete checkpoint under `ckpt_path`, or None."""
    root = Path(ckpt_path)
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        return root / pointer.read_text().strip()
    found = sorted(_complete(root), key=_step)
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_rank{d.rank}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved: the data order does not depend on it
        _set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "trainer.pt", weights_only=True)


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob("global_step*") if p.is_dir() and _NAME.fullmatch(p.name)] if root.is_dir() else []


def _step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
