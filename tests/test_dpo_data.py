"""The DPO data path on the real test conversations: records -> token ids -> batches."""
from pathlib import Path

import pytest
import torch
import transformers

from eeyore.model.chat import LLAMA3_TEMPLATE, ChatTemplate
from eeyore.model.tokenizer import Tokenizer
from eeyore.train.data import DataError, Row
from eeyore.train.dpo import sequence_logps
from eeyore.train.dpo_data import PreferenceFormat, PreferencePair, build_pairs, collate_pairs
from eeyore.train.loss import IGNORE_INDEX
from serve_fixtures import IM_END, byte_tokenizer, tiny_checkpoint

EOT = 128009  # <|eot_id|>
CHAT = PreferenceFormat(prompt_key="prompt", apply_chat_template=True)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    """Meta's Llama 3 tokenizer (the reference model's), from the llama-models wheel."""
    llama_models = pytest.importorskip("llama_models")
    return Tokenizer.from_pretrained(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


def turn_records(conversations, rejected="I don't know. Whatever."):
    """One record per conversation: prompt = everything before its first client turn."""
    records = []
    for conv in conversations:
        j = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        records.append({"prompt": conv[:j], "chosen": [conv[j]], "rejected": rejected})
    return records


def rows(records):
    return [Row(r, f"pairs.jsonl line {i + 1}") for i, r in enumerate(records)]


def test_llama3_response_is_content_plus_eot(llama3, conversations):
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    records = turn_records(conversations)
    pairs, dropped = build_pairs(rows(records), llama3, CHAT, max_len=5120, template=template)
    assert dropped["too_long"] == dropped["empty_response"] == 0 and len(pairs) == 12
    for pair, record in zip(pairs, records):
        prompt = llama3.encode(template.render(record["prompt"], add_generation_prompt=True))
        assert prompt[0] == 128000 and prompt[-2:] == llama3.encode("<|end_header_id|>\n\n")
        assert pair.prompt_len == len(prompt)
        assert pair.chosen == prompt + llama3.encode(record["chosen"][0]["content"].strip()) + [EOT]
        assert pair.rejected == prompt + llama3.encode(record["rejected"]) + [EOT]


def test_whole_conversations_give_the_same_pairs(llama3, conversations):
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    records = turn_records(conversations)
    whole = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + [{"role": "assistant", "content": r["rejected"]}]}
             for r in records]
    with_prompt, _ = build_pairs(rows(records), llama3, CHAT, 5120, template)
    without, _ = build_pairs(rows(whole), llama3, PreferenceFormat(apply_chat_template=True), 5120, template)
    assert with_prompt == without

    k = next(i for i, r in enumerate(records) if len(r["prompt"]) >= 2)
    whole[k]["rejected"][1] = {"role": "user", "content": "something else"}
    with pytest.raises(DataError, match=rf"pairs.jsonl line {k + 1}: 'chosen' and 'rejected' do not share the prompt: they differ at message 1"):
        build_pairs(rows(whole), llama3, PreferenceFormat(apply_chat_template=True), 5120, template)


def test_long_prompts_dropped_and_long_pairs_cut(llama3, conversations):
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    # prompts up to the last client turn: long system prompt plus most of the dialogue
    records = []
    for conv in conversations:
        j = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        records.append({"prompt": conv[:j], "chosen": conv[j]["content"], "rejected": "no " * 400})
    max_len = 700
    prompt_lens = [len(llama3.encode(template.render(r["prompt"], add_generation_prompt=True))) for r in records]
    pairs, dropped = build_pairs(rows(records), llama3, CHAT, max_len, template)
    assert dropped["too_long"] == sum(n >= max_len - 2 for n in prompt_lens) > 0
    assert len(pairs) == 12 - dropped["too_long"] > 0
    for pair in pairs:
        assert len(pair.chosen) <= max_len and len(pair.rejected) == max_len  # 400 "no"s do not fit
        assert pair.chosen[-1] == EOT and pair.rejected[-1] == EOT  # a cut sequence still ends with eos


def test_plain_text_records_and_errors():
    tok = byte_tokenizer()
    fmt = PreferenceFormat(prompt_key="q", input_template="Q: {}\nA: ")
    (pair,), _ = build_pairs(rows([{"q": "hi?", "chosen": "yes\n", "rejected": "no"}]), tok, fmt, 64)
    assert pair.chosen == tok.encode("Q: hi?\nA: yes") + [IM_END]  # trailing newline dropped, eos added
    assert pair.rejected == tok.encode("Q: hi?\nA: no") + [IM_END] and pair.prompt_len == len("Q: hi?\nA: ")

    with pytest.raises(DataError, match=r"line 1: field 'chosen' must be a string without --apply_chat_template"):
        build_pairs(rows([{"q": "hi", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}]), tok, fmt, 64)
    with pytest.raises(DataError, match=r"line 1: missing field 'rejected'"):
        build_pairs(rows([{"prompt": [{"role": "user", "content": "x"}], "chosen": "y"}]), tok, CHAT, 64)
    with pytest.raises(DataError, match=r"line 1: field 'prompt', message 0"):
        build_pairs(rows([{"prompt": [{"role": "user"}], "chosen": "y", "rejected": "z"}]), tok, CHAT, 64)


def test_batch_layout_and_logps_match_transformers(tmp_path):
    """Padded concatenated batch: summed response log-probs equal transformers' on each
    unpadded sequence, with the prompt and padding excluded."""
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    from eeyore.model import Llama

    ours = Llama.from_pretrained(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pairs = [PreferencePair([5, 6, 7, 8, 9, 10], [5, 6, 7, 11], 3, (-1.0, -2.0)),
             PreferencePair([20, 21, 22, 23], [20, 21, 24, 25, 26, 27, 28, 29], 2, (-3.0, -4.0))]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch.input_ids.shape == (4, 8) and batch.pairs == 2 and batch.tokens == 6 + 4 + 4 + 8
    assert batch.ref_logps.tolist() == [-1.0, -3.0, -2.0, -4.0]  # chosen rows first
    # the second chosen row trains tokens 2 and 3 (22, 23): positions 1 and 2 predict them
    assert batch.targets[1].tolist() == [IGNORE_INDEX, 22, 23] + [IGNORE_INDEX] * 5

    with torch.no_grad():
        sums, means = sequence_logps(ours, batch)
    rows_ = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.prompt_len for p in pairs] * 2
    for b, (ids, start) in enumerate(zip(rows_, starts)):
        with torch.no_grad():
            logp = theirs(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expect = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
        assert sums[b].item() == pytest.approx(expect.item(), abs=1e-4)
        assert means[b].item() == pytest.approx(expect.item() / (len(ids) - start), abs=1e-5)
