"""Which tokens SFT trains on, token by token, on the real conversations: with the real Llama 3
tokenizer and the reference's template, and with the demo model's own ChatML template.

The expected ids and targets are built piece by piece (header / content / end-of-turn encoded
separately), independently of the prefix-rendering that `tokenize_conversation` does.
"""
from __future__ import annotations


import pytest
import torch

from eeyore.model.chat import LLAMA3_TEMPLATE, ChatTemplate
from eeyore.model.tokenizer import Tokenizer
from eeyore.train.data import DataError, Row
from eeyore.train.loss import IGNORE_INDEX
from eeyore.train.sft import SFTFormat, build_examples, collate, make_example

MULTITURN = SFTFormat(input_key="messages", apply_chat_template=True, multiturn=True, max_len=16384)


@pytest.fixture(scope="module")
def llama3_chat(llama3) -> ChatTemplate:
    return ChatTemplate.for_tokenizer(llama3, LLAMA3_TEMPLATE)


def _row(messages, **extra) -> Row:
    return Row({"messages": messages, **extra}, "test.jsonl line 7")


def _until_last_assistant(conv):
    return conv[: max(i for i, m in enumerate(conv) if m["role"] == "assistant") + 1]


def _expected(pieces) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for piece, trained in pieces:
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _llama3_pieces(tok, conv):
    yield [tok.bos_id], False
    for m in conv:
        yield tok.encode(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"), False
        yield tok.encode(m["content"].strip()) + [128009], m["role"] == "assistant"  # content + <|eot_id|>


def test_llama3_targets_token_by_token(llama3, llama3_chat, conversations):
    for conv in conversations:
        example = make_example(_row(conv), llama3, llama3_chat, MULTITURN)
        # trailing user turns are dropped; consecutive and leading assistant turns all train
        ids, labels = _expected(_llama3_pieces(llama3, _until_last_assistant(conv)))
        assert example.input_ids == ids
        assert example.labels == labels
        assert example.input_ids[-1] == 128009 and not example.truncated
        # spelled out: bos, headers and their "\n\n" are never targets; <|eot_id|> of an
        # assistant turn is; the target text is exactly the stripped assistant contents
        targets = [t for t in example.labels if t != IGNORE_INDEX]
        assert llama3.decode(targets) == "".join(m["content"].strip() + "<|eot_id|>" for m in conv if m["role"] == "assistant")
        header_ends = [i for i, t in enumerate(ids) if t == 128007]
        assert all(example.labels[i] == IGNORE_INDEX and example.labels[i + 1] == IGNORE_INDEX for i in header_ends)  # <|end_header_id|>, "\n\n"
        assert example.labels[0] == IGNORE_INDEX


def test_chatml_targets_on_demo_model(smollm2_dir, conversations):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    chat = ChatTemplate.for_tokenizer(tok)  # the checkpoint's own template
    im_end = tok.encode("<|im_end|>")
    for conv in conversations:
        example = make_example(_row(conv), tok, chat, MULTITURN)
        kept = _until_last_assistant(conv)
        pieces = []
        for m in kept:
            pieces += [(tok.encode(f"<|im_start|>{m['role']}\n"), False), (tok.encode(m["content"]) + im_end, m["role"] == "assistant")]
            pieces.append((tok.encode("\n"), False))
        ids, labels = _expected(pieces[:-1])  # ends at the last <|im_end|>: the newline after it is never generated
        assert (example.input_ids, example.labels) == (ids, labels)
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(m["content"] + "<|im_end|>" for m in kept if m["role"] == "assistant")


def test_collate_shifts_targets_and_pads(llama3, llama3_chat, conversations):
    examples = [make_example(_row(c), llama3, llama3_chat, MULTITURN) for c in conversations[:3]]
    batch = collate(examples, pad_id=llama3.pad_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == batch.targets.shape == (3, width)
    assert batch.input_ids.dtype == batch.targets.dtype == torch.long
    assert batch.tokens == sum(len(e.input_ids) for e in examples)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch.input_ids[b, :n].tolist() == e.input_ids
        assert (batch.input_ids[b, n:] == llama3.pad_id).all()
        # position t predicts token t + 1; the last real position and padding predict nothing
        assert batch.targets[b, : n - 1].tolist() == e.labels[1:]
        assert (batch.targets[b, n - 1 :] == IGNORE_INDEX).all()


def test_truncation_forces_eos_inside_the_turn(llama3, llama3_chat, conversations):
    conv = conversations[0]
    full = make_example(_row(conv), llama3, llama3_chat, MULTITURN)
    last_start = max(i for i, t in enumerate(full.labels) if t == IGNORE_INDEX) + 1  # start of the last assistant turn
    max_len = last_start + 5
    cut = make_example(_row(conv), llama3, llama3_chat, SFTFormat("messages", None, True, True, max_len))
    assert cut.truncated and len(cut.input_ids) == max_len
    assert cut.input_ids[:-1] == full.input_ids[: max_len - 1]
    assert cut.input_ids[-1] == llama3.eos_ids[0]  # the tokenizer's eos, trained: it is inside the turn
    assert cut.labels == full.labels[: max_len - 1] + [llama3.eos_ids[0]]


def test_over_long_prompts_are_dropped_and_counted(llama3, llama3_chat, conversations):
    conv = conversations[0]
    full = make_example(_row(conv), llama3, llama3_chat, MULTITURN)
    last_start = max(i for i, t in enumerate(full.labels) if t == IGNORE_INDEX) + 1
    fmt = lambda n: SFTFormat("messages", None, True, True, n)  # noqa: E731
    assert make_example(_row(conv), llama3, llama3_chat, fmt(last_start + 2)) == "too_long"  # prompt >= max_len - 2
    assert not isinstance(make_example(_row(conv), llama3, llama3_chat, fmt(last_start + 3)), str)
    no_reply = [{"role": "system", "content": "p"}, {"role": "user", "content": "hi"}]
    rows = [_row(conv), _row(no_reply), _row(conversations[1])]
    examples, counts = build_examples(rows, llama3, llama3_chat, fmt(last_start + 2), "t", show=False)
    assert counts["too_long"] >= 1 and counts["no_assistant"] == 1
    assert len(examples) + counts["too_long"] + counts["no_assistant"] == 3


def test_without_multiturn_only_the_last_turn_trains(llama3, llama3_chat, conversations):
    conv = conversations[1]
    fmt = SFTFormat("messages", None, True, False, 16384)
    example = make_example(_row(conv), llama3, llama3_chat, fmt)
    last = [m for m in conv if m["role"] == "assistant"][-1]["content"].strip()
    assert llama3.decode([t for t in example.labels if t != IGNORE_INDEX]) == last + "<|eot_id|>"
    assert example.input_ids == make_example(_row(conv), llama3, llama3_chat, MULTITURN).input_ids


def test_output_key_is_the_response(llama3, llama3_chat):
    prompt = [{"role": "system", "content": "You are low."}, {"role": "user", "content": "How are you?"}]
    row = _row(prompt, reply="Not great, honestly.")
    for multiturn in (False, True):
        example = make_example(row, llama3, llama3_chat, SFTFormat("messages", "reply", True, multiturn, 512))
        assert llama3.decode([t for t in example.labels if t != IGNORE_INDEX]) == "Not great, honestly.<|eot_id|>"
    with_history = _row(prompt + [{"role": "assistant", "content": "Meh."}, {"role": "user", "content": "Why?"}], reply="Tired.")
    single = make_example(with_history, llama3, llama3_chat, SFTFormat("messages", "reply", True, False, 512))
    multi = make_example(with_history, llama3, llama3_chat, SFTFormat("messages", "reply", True, True, 512))
    assert llama3.decode([t for t in single.labels if t != IGNORE_INDEX]) == "Tired.<|eot_id|>"
    assert llama3.decode([t for t in multi.labels if t != IGNORE_INDEX]) == "Meh.<|eot_id|>Tired.<|eot_id|>"


def test_plain_text_records(llama3):
    row = Row({"input": "Q: how are you?\nA:", "output": " tired\n"}, "t.jsonl line 1")
    example = make_example(row, llama3, None, SFTFormat("input", "output", False, False, 64))
    prompt = llama3.encode("Q: how are you?\nA:")
    assert example.input_ids == prompt + llama3.encode(" tired") + [llama3.eos_ids[0]]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + llama3.encode(" tired") + [llama3.eos_ids[0]]
    with pytest.raises(DataError, match="t.jsonl line 1: plain-text records need --output_key"):
        make_example(row, llama3, None, SFTFormat("input", None, False, False, 64))


def test_bad_records_name_row_and_field(llama3, llama3_chat):
    with pytest.raises(DataError, match=r"test.jsonl line 7: missing field 'conversation'"):
        make_example(_row([]), llama3, llama3_chat, SFTFormat("conversation", None, True, True, 64))
    with pytest.raises(DataError, match=r"test.jsonl line 7: field 'messages', message 1"):
        make_example(_row([{"role": "user", "content": "hi"}, {"role": "assistant"}]), llama3, llama3_chat, MULTITURN)
    unstable = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"test.jsonl line 7: field 'messages': chat template is not prefix-stable"):
        make_example(_row(conv), llama3, unstable, MULTITURN)
