"""What SFT and DPO make of messages that are not plainly system / user / assistant: a capitalised
role trains as that role, an empty message is left out, an empty response drops its record."""
from __future__ import annotations

import pytest

from eeyore.model.chat import ChatTemplate
from eeyore.train.data import DataError, Row, data_warnings
from eeyore.train.dpo_data import PreferenceFormat, build_pairs
from eeyore.train.loss import IGNORE_INDEX
from eeyore.train.sft import SFTFormat, build_examples, make_example
from serve_fixtures import CHATML, byte_tokenizer

TOK = byte_tokenizer()
CHAT = ChatTemplate(CHATML)
MULTITURN = SFTFormat("messages", None, True, True, 512)


def trained(example) -> str:
    return TOK.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_sft_reads_a_capitalised_role_as_that_role_and_leaves_empty_messages_out():
    plain = Row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "meh"}]}, "a.jsonl line 1")
    odd = Row({"messages": [{"role": "User", "content": "hi"}, {"role": "assistant", "content": ""},
                            {"role": "user", "content": " "}, {"role": "ASSISTANT", "content": "meh"}]}, "a.jsonl line 2")
    expected = make_example(plain, TOK, CHAT, MULTITURN)
    assert make_example(odd, TOK, CHAT, MULTITURN) == expected and trained(expected) == "meh<|im_end|>"
    assert [line.split(" (first")[0] for line in data_warnings([plain, odd], "a.jsonl")] == [
        "warning: a.jsonl: 2 role names written in another case or with spaces were read as system/user/assistant, in 1 record",
        "warning: a.jsonl: 2 messages with empty content were dropped, in 1 record",
    ]


def test_sft_drops_records_left_without_a_response():
    only_empty = Row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n"}]}, "a.jsonl line 1")
    reply = Row({"prompt": [{"role": "user", "content": "hi"}], "reply": ""}, "a.jsonl line 2")
    text = Row({"input": "Q: hi\nA:", "output": "  "}, "a.jsonl line 3")
    assert make_example(only_empty, TOK, CHAT, MULTITURN) == "no_assistant"
    assert make_example(reply, TOK, CHAT, SFTFormat("prompt", "reply", True, False, 512)) == "no_assistant"
    assert make_example(text, TOK, None, SFTFormat("input", "output", False, False, 512)) == "empty_response"
    _, counts = build_examples([only_empty], TOK, CHAT, MULTITURN, "a.jsonl", show=False)
    assert counts["no_assistant"] == 1


def test_sft_refuses_an_unknown_role_naming_the_row():
    robot = Row({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "a.jsonl line 9")
    with pytest.raises(DataError, match=r"a.jsonl line 9: field 'messages', message 1: unknown role 'robot'"):
        make_example(robot, TOK, CHAT, MULTITURN)


def test_dpo_drops_pairs_with_an_empty_response_and_empty_prompt_messages():
    fmt = PreferenceFormat(prompt_key="prompt", apply_chat_template=True)
    prompt = [{"role": "system", "content": "be sad"}, {"role": "Assistant", "content": " "}, {"role": "user", "content": "hi"}]
    rows = [
        Row({"prompt": prompt, "chosen": "meh", "rejected": "great!"}, "p.jsonl line 1"),
        Row({"prompt": [prompt[0], prompt[2]], "chosen": "meh", "rejected": "great!"}, "p.jsonl line 2"),
        Row({"prompt": prompt, "chosen": "meh", "rejected": [{"role": "assistant", "content": ""}]}, "p.jsonl line 3"),
        Row({"prompt": prompt, "chosen": " ", "rejected": "great!"}, "p.jsonl line 4"),
    ]
    pairs, dropped = build_pairs(rows, TOK, fmt, 256, CHAT, show=False)
    assert len(pairs) == 2 and pairs[0] == pairs[1]  # the empty prompt message is left out
    assert dropped == {"empty_response": 2}
    text_rows = [Row({"q": "hi", "chosen": "", "rejected": "no"}, "p.jsonl line 1")]
    pairs, dropped = build_pairs(text_rows, TOK, PreferenceFormat(prompt_key="q"), 64, show=False)
    assert pairs == [] and dropped["empty_response"] == 1


def test_dpo_whole_conversations_with_an_empty_last_message_are_dropped_not_misread():
    shared = [{"role": "user", "content": "hi"}]
    row = Row({"chosen": shared + [{"role": "assistant", "content": ""}],
               "rejected": shared + [{"role": "assistant", "content": "great!"}]}, "p.jsonl line 1")
    pairs, dropped = build_pairs([row], TOK, PreferenceFormat(apply_chat_template=True), 64, CHAT, show=False)
    assert pairs == [] and dropped["empty_response"] == 1
