"""Everything the studio writes, written so that a crash never leaves half a record.

JSONL logs are appended one whole line at a time (write, flush, fsync) and a reader drops a
torn last line; whole documents are written to a temporary file and renamed over the old one.
File names are made here from ids the server generated, never from what a request sent.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_append_lock = threading.Lock()


def new_id() -> str:
    return secrets.token_hex(16)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line; after return it is on disk."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock:  # lines of concurrent writers never interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of a log; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` atomically: readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_path(folder: Path, record_id: str) -> Path:
    """The file of a server-made id; anything else is refused before it reaches the disk."""
    if not ID_PATTERN.match(record_id):
        raise KeyError(record_id)
    return folder / f"{record_id}.json"
