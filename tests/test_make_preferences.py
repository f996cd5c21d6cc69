"""Profile perturbation and the round-1 preference builder, on the real test profiles."""
import asyncio
import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eeyore.data.make_preferences import make_preferences, parse_args
from eeyore.data.perturb import PerturbConfig, perturb_profile
from eeyore.profile import (
    DEPRESSION_LEVELS, DISTORTIONS, SYMPTOM_LEVELS, parse_system_prompt, read_level, render_system_prompt,
)
from eval_fakes import FakeEndpoint
from serve_fixtures import tiny_checkpoint

from shared_data import shared_records

RECORDS = shared_records()  # skips this module in a clone without the real profiles


def lookup(profile: dict, field: str):
    value = profile
    for key in field.split("/"):
        value = value[key]
    return value


def test_system_prompt_reads_back_into_the_profile():
    for record in RECORDS:
        prompt = record["conversation"][0]["content"]
        assert render_system_prompt(parse_system_prompt(prompt)) == prompt
    with pytest.raises(ValueError, match="training-style"):
        parse_system_prompt("You are a helpful assistant.")


def test_perturbation_contradicts_the_profile_and_records_each_change():
    for i, record in enumerate(RECORDS):
        original = record["profile"]
        before = json.dumps(original)
        perturbed, changes = perturb_profile(original, random.Random(i), PerturbConfig(symptoms=3, demographics=2))
        assert json.dumps(original) == before  # the input is not modified
        assert render_system_prompt(perturbed) != render_system_prompt(original)
        fields = [c["field"] for c in changes]
        assert sum(f.startswith("symptom severity/") for f in fields) == 3
        assert "depression severity" in fields
        assert sum(f.startswith(DISTORTIONS) for f in fields) == 2  # one swap = two entries
        assert sum(f in ("gender", "age", "marital status", "occupation") for f in fields) == 2
        for change in changes:
            assert lookup(original, change["field"]) == change["from"]
            assert lookup(perturbed, change["field"]) == change["to"] != change["from"]
            levels = SYMPTOM_LEVELS if change["field"].startswith("symptom") else DEPRESSION_LEVELS
            if change["field"].startswith("symptom") or change["field"] == "depression severity":
                old, new = read_level(change["from"], levels)[0], read_level(change["to"], levels)[0]
                assert (old < 2) != (new < 2)  # moved across the middle of the scale
                assert ("-" in change["to"][:2]) == ("-" in change["from"][:2])  # rank prefix style kept
        # a swap keeps how many distortions are exhibited
        assert sorted(perturbed[DISTORTIONS].values()) == sorted(original[DISTORTIONS].values())
        again, same = perturb_profile(original, random.Random(i), PerturbConfig(symptoms=3, demographics=2))
        assert (again, same) == (perturbed, changes)  # seeded: a resumed run makes the same plan


def sft_file(tmp_path: Path) -> Path:
    """SFT-format records (messages only, profile in the system prompt) from the real conversations."""
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": r["conversation"]}) + "\n" for r in RECORDS))
    return path


def reply_for(body: dict) -> str:
    system = body["messages"][0]["content"]
    return f"reply {hashlib.sha1(system.encode()).hexdigest()[:10]} after {len(body['messages'])} messages"


def test_builds_pairs_from_an_endpoint_and_resumes(tmp_path):
    source, out = sft_file(tmp_path), tmp_path / "pairs.jsonl"

    async def scenario():
        async with FakeEndpoint(reply_for) as ep:
            flags = ["--dataset", str(source), "--output", str(out), "--turns_per_conversation", "2"]
            await make_preferences(parse_args(["--endpoint", ep.base_url, "--model", "fake", *flags, "--max_samples", "3"]))
            first = len(ep.requests)
            with out.open("a") as fh:  # an interrupted run leaves half a line behind
                fh.write('{"prompt": [{"role": "sys')
            await make_preferences(parse_args(["--endpoint", ep.base_url, "--model", "fake", *flags, "--max_samples", "5"]))
            return first, ep.requests

    first, requests = asyncio.run(scenario())
    assert first == 6 and len(requests) == 10  # the rerun asks only for the 2 new conversations
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and len({(r["source_row"], r["turn"]) for r in rows}) == 10
    sent = {json.dumps(b["messages"]) for b in requests}
    for row in rows:
        conversation = RECORDS[row["source_row"]]["conversation"]
        turn = row["turn"]
        assert conversation[turn]["role"] == "assistant"
        assert row["prompt"] == conversation[:turn]  # real profile, real dialogue
        assert row["chosen"] == [{"role": "assistant", "content": conversation[turn]["content"]}]
        perturbed = [{"role": "system", "content": row["perturbed_system_prompt"]}, *conversation[1:turn]]
        assert json.dumps(perturbed) in sent  # the rejected reply was asked for under the perturbed profile
        assert row["rejected"] == [{"role": "assistant", "content": reply_for({"messages": perturbed})}]
        assert row["perturbed_system_prompt"] != conversation[0]["content"]
        changed = parse_system_prompt(conversation[0]["content"])
        for change in row["perturbation"]:
            assert lookup(changed, change["field"]) == change["from"]


def test_parquet_output_and_bad_input(tmp_path):
    source, out = sft_file(tmp_path), tmp_path / "pairs.parquet"

    async def scenario():
        async with FakeEndpoint(reply_for) as ep:
            base = ["--endpoint", ep.base_url, "--dataset", str(source), "--output", str(out)]
            await make_preferences(parse_args([*base, "--max_samples", "2"]))
            await make_preferences(parse_args([*base, "--max_samples", "4"]))
            return len(ep.requests)

    assert asyncio.run(scenario()) == 4
    table = pq.read_table(out).to_pylist()
    assert sorted(r["source_row"] for r in table) == [0, 1, 2, 3]
    assert not (tmp_path / "pairs.parquet.partial.jsonl").exists()
    assert table[0]["perturbation"][0].keys() == {"field", "from", "to"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: .*first message must be the system prompt"):
        asyncio.run(make_preferences(parse_args(["--endpoint", "http://127.0.0.1:9/v1", "--dataset", str(bad),
                                                 "--output", str(tmp_path / "o.jsonl")])))


def test_local_engine_generates_the_rejected_side(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "tiny")
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # byte tokens: the profile prompts are ~1500 tokens
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "pairs.jsonl"
    args = parse_args(["--local_model", str(model_dir), "--dataset", str(sft_file(tmp_path)), "--output", str(out),
                       "--max_samples", "2", "--max_tokens", "6", "--concurrency", "2"])
    assert asyncio.run(make_preferences(args)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["rejected"][0]["content"] for r in rows)
    assert all(r["generator"] == str(model_dir) for r in rows)
