"""Resumable training checkpoints: everything needed to continue a killed run exactly.

Layout under `--ckpt_path`:

    global_step12/          one complete checkpoint
        .metadata, *.distcp   model and optimizer, sharded (torch.distributed.checkpoint):
                              each rank writes its own shards; any world size can read them
        trainer.pt            step, epoch, position in the epoch, scheduler, recipe state
        rng_rank{r}.pt        each rank's RNG states
    latest                  name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place only after every rank
has finished, so a crash mid-save leaves the previous checkpoint as `latest`. A checkpoint that
is complete but cannot be read (a truncated or damaged file) is renamed `global_step12.corrupt`
on resume, with a warning, and the previous one is used instead.

`trainer.pt` also records the facts of the run that decide its loss curve (`run_facts` in the
trainer: the training data's content hash, batch size, seed, epochs, total and warmup steps,
scheduler, learning rate). Resuming with any of them changed is refused: the run would continue
on a different curve than the one it started, without saying so.

What resuming unpickles: `trainer.pt` and `rng_rank*.pt` load with `weights_only=True` (tensors
and plain values only) and the shards are raw tensor bytes. torch.distributed.checkpoint writes
`.metadata` with Python's `pickle` and would read it back with `pickle.load`, which runs whatever
a crafted file asks for; we read it with an unpickler that builds only the classes such a file is
made of (`_METADATA_CLASSES`) and refuses anything else, as an unreadable checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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


def data_digest(examples: Sequence[Any]) -> str:
    """A content hash of the training examples, in order: every integer field of each (token ids,
    labels, prompt lengths). Other fields are left out: DPO's precomputed reference log-probs are
    recomputed on resume and may differ in the last bits on another number of ranks."""
    h = hashlib.sha256()
    for example in examples:
        for name, value in vars(example).items():
            ints = np.asarray(value) if isinstance(value, (int, list, tuple)) else None
            if ints is not None and ints.dtype.kind in "iub":
                h.update(f"{name}{ints.shape}".encode())
                h.update(ints.astype(np.int64).tobytes())
    return h.hexdigest()


def check_run(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse, in one line, to resume a checkpoint whose run facts differ from this run's."""
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
        raise ValueError(
            f"{path}: cannot resume: this run differs from the checkpoint's ({'; '.join(changed)}); "
            f"use the checkpoint's data and flags, or another --ckpt_path to start afresh"
        )


def resume(
    ckpt_path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist, facts: dict[str, Any],
) -> tuple[Path, dict[str, Any]] | None:
    """Restore the newest readable checkpoint under `ckpt_path` whose run matches `facts`.

    Returns its path and trainer state, or None when there is no checkpoint. An unreadable one is
    set aside (renamed `*.corrupt`) with a warning and the previous one tried; a readable one
    whose run differs is refused (`check_run`).
    """
    candidates = _newest_first(Path(ckpt_path))
    for path in candidates:
        try:
            state = _agreed(d, lambda: torch.load(path / "trainer.pt", weights_only=True))
            check_run(path, state, facts)
            _agreed(d, lambda: _load_shards(path, model, optimizer, d))
            return path, state
        except _Unreadable as exc:
            if d.is_main:
                print(f"warning: {path} cannot be read ({exc}); set aside as {path.name}.corrupt, trying the previous checkpoint")
                aside = path.with_name(path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            d.barrier()
    if candidates:
        raise ValueError(f"{ckpt_path}: no readable checkpoint left to resume from (all {len(candidates)} were set aside as *.corrupt)")
    return None


class _Unreadable(Exception):
    pass


def _agreed(d: Dist, read):
    """`read()` on every rank; if it failed on any rank, `_Unreadable` on all of them."""
    try:
        result, error = read(), ""
    # whatever a damaged file makes the readers raise (dcp gathers the ranks' errors into a
    # CheckpointException, which is a BaseException)
    except (Exception, dcp.CheckpointException) as exc:
        if isinstance(exc, dcp.CheckpointException):  # name the first rank's own error, not the wrapper
            exc = next(iter(exc.failures.values()))[0]
        result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    failed = torch.tensor([float(bool(error))], device=d.device)
    dist.all_reduce(failed)
    if failed.item():
        raise _Unreadable(error or "unreadable on another rank")
    return result


# Everything a dcp `.metadata` file is made of: its dataclasses, tensor sizes, dtypes, layouts,
# memory formats and paths. Building these runs no code beyond setting their fields.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in _METADATA_CLASSES.get(module, ()):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata; not unpickled")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """dcp's file reader, with `.metadata` read by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    """Restore model, optimizer and this rank's RNG from `path`."""
    rng = path / f"rng_rank{d.rank}.pt"
    # absent when resuming on more ranks than saved: the data order does not depend on it
    rng_state = torch.load(rng, weights_only=True) if rng.is_file() else None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=_Reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng_state is not None:
        _set_rng_state(rng_state)


def _newest_first(root: Path) -> list[Path]:
    """Complete checkpoints, the one `latest` names first, then the others by step, newest first."""
    found = sorted(_complete(root), key=_step, reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return ([named] if named in found else []) + [p for p in found if p != named]


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob("global_step*") if p.is_dir() and _NAME.fullmatch(p.name)] if root.is_dir() else []


def _step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
