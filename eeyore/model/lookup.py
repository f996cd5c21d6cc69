"""Where models and datasets are on this machine: local paths, the local Hugging Face hub cache,
and the folder of the embedded default model.

Nothing is ever downloaded: a hub id (`ORG/NAME`) resolves to the snapshot already in the cache
(`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), the one `refs/main`
names, else the newest. This module only finds paths; `pretrained.resolve_model_dir` adds the
default model's one-time conversion, and `weights` reads what is found.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # `NAME` or `ORG/NAME`: never a path that climbs out


def eeyore_home() -> Path:
    return Path(os.environ.get("EEYORE_HOME", Path.home() / ".cache" / "eeyore"))


def default_model_dir() -> Path:
    """Where `python -m eeyore.model.convert` puts the embedded demo model."""
    return eeyore_home() / "models" / DEFAULT_MODEL_NAME


def hub_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hub_snapshot(repo_id: str, kind: str = "models") -> Path | None:
    """The snapshot of hub repo `repo_id` (`kind`: "models" or "datasets") in the local cache, or None."""
    if not _HUB_ID.fullmatch(repo_id) or repo_id.startswith("."):
        return None
    root = hub_cache() / f"{kind}--{repo_id.replace('/', '--')}"
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def resolve_hub_path(name_or_path: str | Path, kind: str = "models") -> Path:
    """A local path as is, else a hub id looked up in the local cache; else one clear error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    snapshot = hub_snapshot(str(name_or_path), kind) if isinstance(name_or_path, str) else None
    if snapshot is not None:
        return snapshot
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is neither a local path nor a {kind[:-1]} in the local Hugging Face cache "
        f"({hub_cache()}/{kind}--{str(name_or_path).replace('/', '--')}); this machine cannot download it"
    )


def find_model_dir(name_or_path: str | Path) -> Path:
    """The checkpoint folder `name_or_path` names (a local folder or a cached hub id), checked to be one."""
    path = resolve_hub_path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model checkpoint: it has no config.json")
    return path
