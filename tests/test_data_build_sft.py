"""SFT records from conversations and profiles: the system prompt as training renders it, client
turns as `assistant`, the filters, the data card, and one real SFT step on the records."""
from __future__ import annotations

import json
import math

import pytest
import torch

from eeyore.data.build_sft import has_traits, main
from eeyore.model import Llama, LlamaConfig
from eeyore.model.chat import ChatTemplate, tokenize_conversation
from eeyore.model.tokenizer import Tokenizer
from eeyore.profile import load_profiles, render_system_prompt, sample_profiles_path
from eeyore.train import sft

SAMPLES = str(sample_profiles_path())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with the demo model's tokenizer and chat template."""
    root = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_ids, torch_dtype="float32",
    )
    torch.manual_seed(0)
    Llama(config).save_pretrained(root, tok)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("sft") / "set"
    assert main([SAMPLES, SAMPLES, "--output", str(out), "--require-trait", "severe", "--max-tokens", "600",
                 "--tokenizer", str(tiny)]) == 0
    return out


def test_records_are_the_conversations_under_their_rendered_profile(built, tiny):
    records = [json.loads(line) for line in (built / "train.jsonl").read_text().splitlines()]
    profiles = {f"{p.record['source']} {p.record['id_source']}": p for p in load_profiles()}
    # kept: every profile with a severe symptom whose record has at most 600 tokens
    tok = Tokenizer.from_pretrained(tiny)
    chat = ChatTemplate.for_tokenizer(tok)
    lengths = {k: tokenize_conversation(tok, p.conversation, chat)[1][-1][1] for k, p in profiles.items()}
    severe = {k for k, p in profiles.items() if "severe" in p.symptom_levels().values()}
    assert [r["conversation_id"] for r in records] == [k for k in profiles if k in severe and lengths[k] <= 600]
    assert 0 < len(records) < len(severe) < len(profiles)  # both filters dropped something
    for r in records:
        p = profiles[r["conversation_id"]]
        assert r["messages"][0] == {"role": "system", "content": render_system_prompt(p, "train")}
        assert r["messages"] == p.conversation  # the stored sample conversations are in training form already
        assert r["profile"] == p.fields


def test_data_card_counts_and_charts(built):
    card = (built / "README.md").read_text()
    assert "| conversations | 5 |" in card and "| without a required trait | 1 |" in card
    assert "| longer than 600 tokens | 1 |" in card and "| written | 3 |" in card
    assert "--input_key messages --apply_chat_template --multiturn --max_len 600" in card
    for name in ("lengths.png", "traits.png"):
        assert f"]({name})" in card and (built / name).read_bytes()[:4] == b"\x89PNG"
    assert "| symptom level (all 18 per record) | records |" in card and "| Severe |" in card
    assert "| cognitive distortion (exhibited) | records |" in card


def test_client_role_min_turns_and_missing_profiles(tmp_path, tiny):
    p = load_profiles()[0]
    turns = [{"role": "client" if m["role"] == "assistant" else "therapist", "content": m["content"]}
             for m in p.conversation[1:]]
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps({"id": "a", "messages": turns}) + "\n" + json.dumps({"id": "b", "messages": turns[:2]}) + "\n"
                     + json.dumps({"id": "c", "messages": turns}) + "\n")
    profiles = tmp_path / "profiles.jsonl"
    profiles.write_text("".join(json.dumps({"conversation_id": k, "profile": p.fields}) + "\n" for k in "ab"))
    out = tmp_path / "out"
    assert main([str(convs), str(profiles), "--output", str(out), "--client-role", "client", "--min-turns", "2",
                 "--tokenizer", str(tiny)]) == 0
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["conversation_id"] for r in records] == ["a"]
    assert records[0]["messages"] == p.conversation
    card = (out / "README.md").read_text()
    assert "| without a profile | 1 |" in card and "| fewer than 2 client turns | 1 |" in card


def test_require_trait_by_class_or_name():
    fields = load_profiles()[3].fields  # mild symptoms and distortions only
    assert has_traits(fields, ["mild", "distortion"]) is None
    assert has_traits(fields, ["mild", "severe"]) == "severe"
    shown = next(k for k, v in fields["cognition distortion exhibition"].items() if v == "Exhibited")
    assert has_traits(fields, [shown.upper()]) is None


def test_records_train_one_sft_step(built, tiny, tmp_path):
    sft.main([
        "--pretrain", str(tiny), "--dataset", str(built / "train.jsonl"), "--input_key", "messages",
        "--apply_chat_template", "--multiturn", "--max_len", "600", "--train_batch_size", "3",
        "--micro_train_batch_size", "1", "--max_epochs", "1", "--learning_rate", "1e-3", "--save_path", str(tmp_path / "out"),
    ])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"]) and steps[0]["loss"] > 5  # random init: ~ln(vocab)


def test_bad_profiles_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"conversation_id": "a", "profile": {"age": "3"}}) + "\n")
    assert main([SAMPLES, str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "p.jsonl line 1: missing field 'profile.name'" in err and err.count("\n") == 1
