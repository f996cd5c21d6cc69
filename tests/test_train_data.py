"""Training data: every on-disk layout `--dataset` accepts, splits, max_samples, and errors that
name the file, row and field."""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eeyore.train.data import DataError, data_warnings, load_rows

RECORDS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _records(rows):
    return [r.record for r in rows]


def test_single_files(tmp_path):
    _jsonl(tmp_path / "a.jsonl", RECORDS)
    (tmp_path / "b.json").write_text(json.dumps(RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert _records(load_rows(str(tmp_path / name))) == RECORDS
    assert _records(load_rows(str(tmp_path / "a.jsonl"), max_samples=2)) == RECORDS[:2]


def test_folder_splits_like_a_hub_snapshot(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS[:3]), _mk(tmp_path / "data" / "train-00000-of-00002.parquet"))
    pq.write_table(pa.Table.from_pylist(RECORDS[3:4]), tmp_path / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[4:]), tmp_path / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("card")
    assert _records(load_rows(str(tmp_path), "train")) == RECORDS[:4]
    assert _records(load_rows(str(tmp_path), "test")) == RECORDS[4:]
    with pytest.raises(DataError, match="no files for split 'validation'.*test, train"):
        load_rows(str(tmp_path), "validation")


def test_folder_without_split_names_is_train(tmp_path):
    _jsonl(tmp_path / "part1.jsonl", RECORDS[:2])
    _jsonl(tmp_path / "part2.jsonl", RECORDS[2:])
    assert _records(load_rows(str(tmp_path))) == RECORDS


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_to_disk(folder, records):
    """The files `datasets.Dataset.save_to_disk` writes: an Arrow IPC stream plus state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))


def test_save_to_disk_layouts(tmp_path):
    _save_to_disk(tmp_path / "ds", RECORDS)
    assert _records(load_rows(str(tmp_path / "ds"))) == RECORDS
    _save_to_disk(tmp_path / "dd" / "train", RECORDS[:3])
    _save_to_disk(tmp_path / "dd" / "test", RECORDS[3:])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert _records(load_rows(str(tmp_path / "dd"), "test")) == RECORDS[3:]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_rows(str(tmp_path / "dd"), "dev")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--someone--therapy"
    _jsonl(repo / "snapshots" / "abc123" / "train.jsonl", RECORDS)
    _mk(repo / "refs" / "main").write_text("abc123")
    assert _records(load_rows("someone/therapy")) == RECORDS
    with pytest.raises(FileNotFoundError, match="someone/other.*hub"):
        load_rows("someone/other")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n{broken\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 3: invalid JSON"):
        load_rows(str(path))


def test_field_errors_name_row_and_field(tmp_path):
    records = [RECORDS[0], {"messages": [{"role": "user", "content": 3}]}, {"text": "x"}]
    _jsonl(tmp_path / "d.jsonl", records)
    good, wrong_type, missing = load_rows(str(tmp_path / "d.jsonl"))
    assert good.messages("messages") == RECORDS[0]["messages"]
    with pytest.raises(DataError, match=r"d.jsonl line 2: field 'messages', message 0: expected"):
        wrong_type.messages("messages")
    with pytest.raises(DataError, match=r"d.jsonl line 3: missing field 'messages' \(fields: 'text'\)"):
        missing.messages("messages")
    with pytest.raises(DataError, match=r"d.jsonl line 1: field 'messages' must be a string"):
        good.text("messages")


def test_roles_are_normalised_or_refused_and_empty_messages_dropped(tmp_path):
    messages = [{"role": "System", "content": "profile"}, {"role": "assistant", "content": "hi"},
                {"role": " Assistant ", "content": "again"}, {"role": "user", "content": "  \n"},
                {"role": "user", "content": "why?"}, {"role": "USER", "content": ""}]
    _jsonl(tmp_path / "d.jsonl", [{"messages": messages}, RECORDS[0], {"messages": messages[:2]}])
    rows = load_rows(str(tmp_path / "d.jsonl"))
    # the same role twice in a row and a conversation starting with the assistant are kept as they are
    assert rows[0].messages("messages") == messages  # as stored, for tools with roles of their own
    assert rows[0].turns("messages") == [
        {"role": "system", "content": "profile"}, {"role": "assistant", "content": "hi"},
        {"role": "assistant", "content": "again"}, {"role": "user", "content": "why?"}]
    assert len(rows[0].turns("messages", keep_empty=True)) == 6
    rows[2].turns("messages")
    path = tmp_path / "d.jsonl"
    assert data_warnings(rows, "d.jsonl") == [
        f"warning: d.jsonl: 4 role names written in another case or with spaces were read as system/user/assistant, "
        f"in 2 records (first: {path} line 1, field 'messages', message 0: 'System')",
        f"warning: d.jsonl: 2 messages with empty content were dropped, in 1 record "
        f"(first: {path} line 1, field 'messages', message 3: user '  \\n')",
    ]
    assert data_warnings(rows[1:2], "d.jsonl") == []


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], "message 1: unknown role 'robot' (expected one of system, user, assistant)"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "new rules"}], "message 1: a system message after the first message"),
])
def test_unknown_roles_and_late_system_messages_are_refused(tmp_path, messages, error):
    _jsonl(tmp_path / "d.jsonl", [RECORDS[0], {"messages": messages}])
    with pytest.raises(DataError, match=rf"d.jsonl line 2: field 'messages', {re.escape(error)}"):
        load_rows(str(tmp_path / "d.jsonl"))[1].turns("messages")


def test_a_string_field_is_one_message_of_the_given_role(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"q": "hello", "a": " "}])
    (row,) = load_rows(str(tmp_path / "d.jsonl"))
    assert row.chat("q", "user") == [{"role": "user", "content": "hello"}]
    assert row.chat("a", "assistant") == [] and row.chat("a", "assistant", keep_empty=True) == [{"role": "assistant", "content": " "}]
