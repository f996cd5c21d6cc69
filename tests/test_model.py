"""The Llama module against transformers on tiny random configs, and the KV cache against the full forward."""
import json

import pytest
import torch
import transformers

from eeyore.model import KVCache, Llama, LlamaConfig
from eeyore.model.pretrained import resolve_model_dir
from eeyore.model.weights import load_state_dict

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so the test's positions cross every band
}


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=[2, 3], torch_dtype="float32",
    )
    base.update(overrides)
    return LlamaConfig(**base)


def random_model(config: LlamaConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():  # norms away from 1 so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


CONFIGS = {
    "gqa-untied-llama3": dict(rope_scaling=LLAMA3_SCALING),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-headdim": dict(head_dim=32, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    config = tiny_config(**CONFIGS[name])
    random_model(config).save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 80))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_rope_parameters_layout_is_read(tmp_path):
    """Newer transformers write `rope_parameters`; it must mean the same as the classic layout."""
    config = tiny_config(rope_scaling=LLAMA3_SCALING)
    random_model(config).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta"), **hf.pop("rope_scaling")}
    hf["eos_token_id"] = 2
    parsed = LlamaConfig.from_hf(hf)
    assert parsed.rope_theta == 10000.0 and parsed.rope_scaling == LLAMA3_SCALING and parsed.eos_token_id == [2]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ours = Llama.from_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, 100))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


def test_bf16_loads_and_runs(tmp_path):
    config = tiny_config()
    random_model(config).save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path, dtype="bfloat16")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    assert torch.isfinite(a).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().max() < 0.1


def test_kv_cache_rows_at_different_positions_equal_full_forward():
    config = tiny_config(rope_scaling=LLAMA3_SCALING)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 70))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config, slots=3, max_len=96)
        # slot 2 first holds an unrelated longer sequence: its stale entries must be masked
        model(torch.randint(0, 320, (1, 90)), torch.arange(90)[None], cache.rows(2, 3))
        model(ids[:1, :50], torch.arange(50)[None], cache.rows(1, 2))
        model(ids[1:, :20], torch.arange(20)[None], cache.rows(2, 3))
        for step in range(20):  # decode: row 0 (slot 1) runs 30 tokens ahead of row 1 (slot 2)
            positions = torch.tensor([[50 + step], [20 + step]])
            tokens = torch.stack([ids[0, 50 + step], ids[1, 20 + step]])[:, None]
            out = model(tokens, positions, cache.rows(1, 3))
            assert (out[0, 0] - full[0, 50 + step]).abs().max() < 1e-5
            assert (out[1, 0] - full[1, 20 + step]).abs().max() < 1e-5


def test_a_pass_that_fills_a_cache_from_its_start_attends_causally_without_a_mask(monkeypatch):
    """Rows whose queries are positions 0..T-1 with nothing else to read are plain causal
    attention (no mask built); a later chunk, or a pass told to read further, keeps the mask.
    The logits are the full forward's either way."""
    config = tiny_config()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 30))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: masks.append(kw.get("attn_mask") is not None) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config, slots=2, max_len=40)
        passes = [  # (tokens, positions, span given to the cache view, mask expected)
            (ids[:, :20], torch.arange(20).expand(2, -1), None, False),
            (ids[:, 20:], torch.arange(20, 30).expand(2, -1), None, True),
            (ids[:, :20], torch.arange(20).expand(2, -1), 25, True),  # reads 5 positions beyond its own
        ]
        for tokens, positions, span, expect_mask in passes:
            masks.clear()
            out = model(tokens, positions, cache.rows(0, 2, span))
            assert masks == [expect_mask] * config.num_hidden_layers
            torch.testing.assert_close(out, full[:, positions[0]], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_reproduces_the_full_forward():
    """Each greedy token, decoded with the cache, is the argmax of a full forward over the prefix."""
    config = tiny_config()
    model = random_model(config, seed=3)
    prompt = torch.randint(0, config.vocab_size, (1, 12))
    cache = KVCache(config, slots=1, max_len=64)
    with torch.no_grad():
        logits = model(prompt, torch.arange(12)[None], cache)
        seq = prompt[0].tolist()
        for pos in range(12, 40):
            seq.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[seq[-1]]]), torch.tensor([[pos]]), cache)
        full = model(torch.tensor([seq]))
    assert full[0, 11:-1].argmax(-1).tolist() == seq[12:]


def test_packed_sequences_equal_separate_forwards():
    config = tiny_config()
    model = random_model(config)
    a, b = torch.randint(0, 320, (1, 30)), torch.randint(0, 320, (1, 17))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(30), torch.arange(17)])[None]
    with torch.no_grad():
        out = model(packed, positions, cu_seqlens=torch.tensor([0, 30, 47]))
        assert (out[:, :30] - model(a)).abs().max() < 1e-5
        assert (out[:, 30:] - model(b)).abs().max() < 1e-5


def test_sharded_save_loads_in_transformers(tmp_path):
    config = tiny_config()
    model = random_model(config)
    model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_state_dict(tmp_path)
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, 30))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() < 1e-4


def test_hub_id_resolves_through_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    random_model(tiny_config()).save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model_dir("acme/tiny") == snapshot
    assert Llama.from_pretrained("acme/tiny").config.vocab_size == 320


def test_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="acme/absent.*local Hugging Face cache"):
        Llama.from_pretrained("acme/absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Llama.from_pretrained(tmp_path / "empty")
