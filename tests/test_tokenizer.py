"""Tokenizer backends against their reference implementations (Meta's tiktoken tokenizer,
SentencePiece itself, transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eeyore.model.tokenizer import Tokenizer

VARIED = [
    "Hello world",
    "   leading spaces and trailing   ",
    "numbers 1234567 and 3.14159, dates 2024-01-31",
    "émojis 😀👍🏽 and 中文字符 and Ελληνικά",
    "I'M don't YOU'LL we've",
    "tabs\t\tand\n\n\nnewlines  \n ",
    "",
    " ",
    "a  b   c",
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ",
    "Tôi nhiều việc ở Việt Nam",  # Llama 3 words that are tokens but that merges alone would split
]


@pytest.fixture(scope="module")
def meta_llama3(llama3_path):
    pytest.importorskip("tiktoken")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_path)


def _texts(conversations: list[list[dict]]) -> list[str]:
    return VARIED + [m["content"] for conv in conversations for m in conv]


def _train_sentencepiece(directory: Path, conversations: list[list[dict]], **options):
    """A tiny SentencePiece model trained on the real conversations; returns its processor."""
    spm = pytest.importorskip("sentencepiece")
    corpus = [m["content"] for conv in conversations for m in conv][:120]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        hard_vocab_limit=False, minloglevel=2, **options,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def test_llama3_tiktoken_matches_meta(llama3, meta_llama3, conversations):
    texts = _texts(conversations)
    texts.append("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    for text in texts:
        ids = llama3.encode(text)
        assert ids == meta_llama3.encode(text, bos=False, eos=False, allowed_special="all"), text
        assert llama3.decode(ids) == meta_llama3.decode(ids) == text


def test_llama3_special_ids(llama3):
    # the Llama 3 special ids and the instruct eos ids, as Meta ships them
    assert llama3.vocab_size == 128256
    assert llama3.bos_id == 128000
    assert llama3.eos_ids == [128001, 128008, 128009]
    assert llama3.pad_id == 128004
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
    assert [llama3.encode(s) for s in specials] == [[128006], [128007], [128008], [128009]]
    assert llama3.decode([128000, 9906, 128009], skip_special_tokens=True) == "Hello"


def test_saved_tokenizer_loads_in_transformers(llama3_path, tmp_path, conversations):
    from transformers import AutoTokenizer

    llama3 = Tokenizer.from_pretrained(llama3_path)  # a copy of its own: the template is changed
    llama3.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    llama3.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")
    assert hf.chat_template == llama3.chat_template
    for text in _texts(conversations)[:40]:
        assert hf.encode(text, add_special_tokens=False) == llama3.encode(text)
    assert hf.encode("hi")[0] == 128000  # HF callers that ask for special tokens get bos, as with Llama 3

    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(VARIED[3]) == llama3.encode(VARIED[3])
    assert (again.bos_id, again.eos_ids[0], again.pad_id) == (128000, 128001, 128004)
    assert again.chat_template == llama3.chat_template


def test_tokenizer_config_and_generation_config(llama3, tmp_path):
    llama3.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|eot_id|>", "special": True}  # AddedToken form
    config["chat_template"] = [{"name": "default", "template": "from config"}, {"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_ids == [128009, 128001, 128008]  # the tokenizer's own eos first
    assert tok.chat_template == "from config"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "from file"


@pytest.mark.parametrize(
    "options",
    [
        # Llama 2 style: BPE, byte fallback, no normalization, whitespace kept as is
        dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False),
        # SentencePiece defaults: unigram, NFKC normalization, extra whitespace removed
        dict(model_type="unigram"),
        dict(model_type="bpe"),
    ],
    ids=["bpe-llama2", "unigram-nfkc", "bpe-nfkc"],
)
def test_sentencepiece_matches_sentencepiece(options, tmp_path, conversations):
    sp = _train_sentencepiece(tmp_path, conversations, **options)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.unk_token) == (sp.bos_id(), [sp.eos_id()], "<unk>")
    for text in _texts(conversations):
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        if sp.unk_id() not in ids:  # SentencePiece spells unknowns " ⁇ ", HF keeps "<unk>"
            assert tok.decode(ids) == sp.decode(ids)


def test_stream_decoder_never_splits_characters(llama3):
    text = "Ça va 😀👍🏽 中文字符 ok — ünïcödé"
    ids = llama3.encode(text)
    stream = llama3.stream_decoder()
    chunks = [stream.step(i) for i in ids]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks  # some ids end inside a character and are held back


def test_stream_decoder_context_keeps_leading_space(tmp_path, conversations):
    _train_sentencepiece(tmp_path, conversations, model_type="bpe", byte_fallback=True)
    tok = Tokenizer.from_pretrained(tmp_path)
    prompt, reply = tok.encode("I feel"), tok.encode(" so tired")
    ids = tok.encode("I feel so tired")
    assert prompt + reply == ids  # SentencePiece pieces start at spaces
    stream = tok.stream_decoder(context=prompt)
    assert "".join(stream.step(i) for i in reply) == " so tired"
    fresh = tok.stream_decoder()
    assert "".join(fresh.step(i) for i in reply) == "so tired"  # like decode(reply) alone


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xfe not a model")
    with pytest.raises(ValueError, match="tokenizer.model: neither a tiktoken"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:3: expected 'base64-token rank'"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        Tokenizer.from_pretrained("no-such-org/no-such-model")
