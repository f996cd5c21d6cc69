"""Training records from files, folders and the local HF hub cache.

`load_rows(spec, split, max_samples)` accepts what `--dataset` accepts in OpenRLHF, offline:

- a `.jsonl`, `.json` or `.parquet` file (the whole file, whatever the split);
- a folder of such files, split by name the way HF hub repos are laid out
  (`train.jsonl`, `data/train-00000-of-00001.parquet`, `test/part-0.jsonl`); a folder whose
  files name no split is all `train`;
- a folder written by `datasets.save_to_disk` (a `Dataset` with `state.json`, or a
  `DatasetDict` with `dataset_dict.json` and one sub-folder per split, Arrow files inside);
- a hub id `ORG/NAME` whose snapshot is in the local HF cache.

Every row remembers where it came from, so a recipe can name the file, row and field of a
malformed record (`DataError`).

What `Row.turns` (training's reading of messages; `Row.messages` keeps them as stored) does with
messages that are not plainly system / user / assistant:

- a known role written in another case or with spaces (`Assistant`, ` user`) is read as that role,
  and counted (`data_warnings` names how many and the first);
- any other role (`robot`, `tool`) is refused, and so is a system message after the first message:
  neither has one meaning for the chat templates we train with;
- a message whose content is empty or only whitespace is dropped, and counted: it would train
  the model to answer with nothing (recipes decide what an empty *response* means);
- the same role twice in a row, and conversations that start with the assistant, are kept as
  they are: the reference data has both.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from eeyore.model.lookup import hub_cache, resolve_hub_path

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_SPLIT_WORDS = ("train", "test", "validation", "valid", "dev", "eval")


class DataError(ValueError):
    """A dataset that cannot be read, or a record that does not have the expected shape."""


ROLES = ("system", "user", "assistant")
# What reading messages changed, by kind: the text of the warning that counts them.
NOTES = {
    "role_case": "role names written in another case or with spaces were read as system/user/assistant",
    "empty": "messages with empty content were dropped",
}


@dataclass
class Row:
    record: dict[str, Any]
    where: str  # "path line 12" / "path row 7": for error messages
    # (kind, field, message index) -> what was there; see NOTES
    notes: dict[tuple[str, str, int], str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def field(self, key: str) -> Any:
        if key not in self.record:
            raise DataError(f"{self.where}: missing field {key!r} (fields: {', '.join(map(repr, self.record))})")
        return self.record[key]

    def messages(self, key: str) -> list[dict[str, str]]:
        """`record[key]` checked to be a list of {"role": str, "content": str} messages, as stored
        (data-building tools read conversations whose roles are their own)."""
        value = self.field(key)
        if not isinstance(value, list) or not value:
            raise DataError(f"{self.where}: field {key!r} must be a non-empty list of messages, got {_short(value)}")
        for i, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise DataError(
                    f"{self.where}: field {key!r}, message {i}: expected {{'role': str, 'content': str}}, got {_short(msg)}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def turns(self, key: str, keep_empty: bool = False) -> list[dict[str, str]]:
        """`messages` read for training: roles normalised or refused (see the top of this file),
        messages with empty content dropped unless `keep_empty`."""
        out = [{"role": self._role(key, i, m["role"]), "content": m["content"]} for i, m in enumerate(self.messages(key))]
        return out if keep_empty else self.drop_empty(key, out)

    def chat(self, key: str, role: str, keep_empty: bool = False) -> list[dict[str, str]]:
        """Field `key` as training messages: a message list (see `turns`), or a string as one `role` message."""
        value = self.field(key)
        if not isinstance(value, str):
            return self.turns(key, keep_empty)
        one = [{"role": role, "content": value}]
        return one if keep_empty else self.drop_empty(key, one)

    def _role(self, key: str, i: int, role: str) -> str:
        name = role.strip().lower()
        if name not in ROLES:
            raise DataError(f"{self.where}: field {key!r}, message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if name == "system" and i > 0:
            raise DataError(f"{self.where}: field {key!r}, message {i}: a system message after the first message")
        if name != role:
            self.notes[("role_case", key, i)] = repr(role)
        return name

    def drop_empty(self, key: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` of field `key` without those whose content is empty or whitespace (noted)."""
        for i, m in enumerate(messages):
            if not m["content"].strip():
                self.notes[("empty", key, i)] = f"{m['role']} {m['content']!r}"
        return [m for m in messages if m["content"].strip()]

    def text(self, key: str) -> str:
        value = self.field(key)
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field {key!r} must be a string, got {_short(value)}")
        return value


def data_warnings(rows: Sequence[Row], name: str) -> list[str]:
    """One line per kind of change reading `rows` made: how many messages, in how many records, the first."""
    lines = []
    for kind, text in NOTES.items():
        hits = [(row, key, detail) for row in rows for key, detail in row.notes.items() if key[0] == kind]
        if hits:
            row, (_, key, i), detail = hits[0]
            records = len({id(r) for r, _, _ in hits})
            lines.append(f"warning: {name}: {len(hits)} {text}, in {records} record{'s' * (records > 1)} "
                         f"(first: {row.where}, field {key!r}, message {i}: {detail})")
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_rows(spec: str, split: str = "train", max_samples: int | None = None) -> list[Row]:
    """The rows of `split` in dataset `spec` (file, folder or cached hub id), the first `max_samples`."""
    rows: list[Row] = []
    for path in _files(_locate(spec), split):
        for row in _read(path):
            rows.append(row)
            if max_samples is not None and len(rows) >= max_samples:
                return rows
    return rows


def _locate(spec: str) -> Path:
    try:
        return resolve_hub_path(spec, "datasets")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dataset {spec!r}: no such file or folder, and no snapshot of a hub dataset of that name in "
            f"{hub_cache()} (this machine is offline: download it elsewhere and pass its folder)"
        ) from None


def _files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        return [path]
    if (path / "dataset_dict.json").is_file():  # datasets.save_to_disk(DatasetDict)
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
        return _files(path / split, split)
    if (path / "state.json").is_file():  # datasets.save_to_disk(Dataset): one split
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    files = sorted(
        p for p in path.rglob("*")
        if p.suffix in SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f.relative_to(path), split), []).append(f)
    if split in by_split:
        return by_split[split]
    if split == "train" and set(by_split) == {None}:
        return files
    named = sorted(s for s in by_split if s)
    raise DataError(f"{path}: no files for split {split!r} (splits found: {', '.join(named) or 'none'})")


def _split_of(rel: Path, wanted: str) -> str | None:
    """The split a file belongs to, from its folder names or its file name (HF hub conventions)."""
    names = [*rel.parts[:-1], rel.name.split(".")[0]]
    for name in names:
        for word in (wanted, *_SPLIT_WORDS):
            if re.fullmatch(rf"{re.escape(word)}([-_ \d].*)?", name):
                return word
    return None


def _read(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON lines saved with a .json name
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [_row(rec, f"{path} record {i}") for i, rec in enumerate(data)]
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else _read_arrow(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return [_row(rec, f"{path} row {i}") for i, rec in enumerate(table.to_pylist())]


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno}: invalid JSON: {exc}") from None
            rows.append(_row(rec, f"{path} line {lineno}"))
    return rows


def _row(record: Any, where: str) -> Row:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_short(record)}")
    return Row(record, where)
