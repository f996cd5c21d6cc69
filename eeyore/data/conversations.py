"""Conversations to build data from, and the JSON-lines files the data tools append to.

A conversation is any record with a list of messages (`messages`, or `conversation` as in the
profile files); `client_role` names the role the client speaks in, every other non-system role
is the counsellor. A conversation is named by its `id` field, else by `source` + `id_source`
(as the shared test profiles are), else by its position: the name joins a conversation to its
extracted profile and lets a rerun skip what an earlier run finished.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from eeyore.profile import profile_errors
from eeyore.train.data import DataError, Row, load_rows


@dataclass
class Conversation:
    id: str
    row: int  # position in the input
    where: str  # "file line 3", for messages
    messages: list[dict[str, str]]  # without system messages, roles as in the input
    client_role: str
    record: dict[str, Any]

    def client_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == self.client_role]

    def as_training(self) -> list[dict[str, str]]:
        """The turns in the training roles: the client is `assistant`, the counsellor `user`."""
        return [{"role": "assistant" if m["role"] == self.client_role else "user", "content": m["content"]}
                for m in self.messages]


def record_id(record: dict[str, Any], index: int) -> str:
    if record.get("id") is not None:
        return str(record["id"])
    if record.get("source") is not None and record.get("id_source") is not None:
        return f"{record['source']} {record['id_source']}"
    return f"#{index}"


def messages_key_of(row: Row, messages_key: str) -> str:
    """`messages_key`, or `conversation` for a profile record that has no such field."""
    return messages_key if messages_key in row.record or "conversation" not in row.record else "conversation"


def conversation_of(row: Row, index: int, messages_key: str, client_role: str) -> Conversation:
    messages = [m for m in row.messages(messages_key_of(row, messages_key)) if m["role"] != "system"]
    return Conversation(record_id(row.record, index), index, row.where, messages, client_role, row.record)


def load_conversations(spec: str, messages_key: str = "messages", client_role: str = "assistant",
                       max_samples: int | None = None) -> list[Conversation]:
    """Every conversation of a .json/.jsonl/.parquet file or folder; DataError names a bad row or a
    name used twice."""
    convs = [conversation_of(row, i, messages_key, client_role) for i, row in enumerate(load_rows(spec, "train", max_samples))]
    seen: dict[str, Conversation] = {}
    for c in convs:
        if c.id in seen:
            raise DataError(f"{c.where}: conversation id {c.id!r} is used by {seen[c.id].where} too")
        seen[c.id] = c
    return convs


def load_profile_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """conversation name -> profile record of a profiles file (extract_profiles output, or a list of
    profile records like the shared test profiles), each validated (DataError names the bad one)."""
    out: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(load_rows(str(path))):
        errors = profile_errors(row.record)
        if errors:
            raise DataError(f"{row.where}: {'; '.join(errors)}")
        key = str(row.record["conversation_id"]) if "conversation_id" in row.record else record_id(row.record, index)
        out[key] = row.record
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file this package appends to. A last line cut short by an
    interrupted run is removed first, so the file stays valid and the record is redone."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {lineno}: not a JSON line written by this tool; pass another "
                            "output or remove the file") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object")
        out.append(record)
    return out


def append_record(sink, record: dict[str, Any]) -> None:
    """One whole line per write, flushed and synced: an interruption loses at most the line being written."""
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write beside `path` and rename over it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
