"""SFT and DPO train exactly the same tokens of the same conversation (`eeyore/train/tokens.py`):
the chosen side of a DPO pair is, id for id and label for label, the SFT example of prompt +
response, and both go through the same shift into the same targets, padded or packed.

Also the case a tokenizer merges across the prompt / response boundary (a generation prompt that
ends in a space): which tokens train there, spelled out against OpenRLHF's texts and counts.
"""
from __future__ import annotations

import pytest

from eeyore.model.chat import LLAMA3_TEMPLATE, ChatTemplate, TemplateError, tokenize_conversation
from eeyore.model.tokenizer import Tokenizer
from eeyore.train import sft
from eeyore.train.data import Row
from eeyore.train.dpo_data import PreferenceFormat, build_pairs, collate_pairs, collate_pairs_packed, end_of_turn_id
from eeyore.train.loss import IGNORE_INDEX

DPO = PreferenceFormat(prompt_key="prompt", apply_chat_template=True)
LAST_TURN = sft.SFTFormat("messages", None, True, False, 1 << 20)  # trains the last assistant turn
OUTPUT_KEY = sft.SFTFormat("prompt", "reply", True, False, 1 << 20)  # trains the reply after the prompt


def trained(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def dpo_chosen(tok, chat, prompt, reply):
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}], "rejected": "I don't know."}
    (pair,), dropped = build_pairs([Row(record, "pairs.jsonl line 1")], tok, DPO, 1 << 20, chat, show=False)
    return pair, pair.examples()[0]


def same_tokens_on_every_turn(tok: Tokenizer, chat: ChatTemplate, conversations) -> int:
    checked = 0
    for conv in conversations:
        for j in [i for i, m in enumerate(conv) if m["role"] == "assistant"][:4]:
            prompt, reply = conv[:j], conv[j]["content"]
            pair, chosen = dpo_chosen(tok, chat, prompt, reply)
            as_conversation = sft.make_example(Row({"messages": conv[: j + 1]}, "c"), tok, chat, LAST_TURN)
            as_reply = sft.make_example(Row({"prompt": prompt, "reply": reply}, "c"), tok, chat, OUTPUT_KEY)
            assert chosen == as_conversation == as_reply  # same ids, same labels
            assert pair.prompt_len == len(tok.encode(chat.render(prompt, add_generation_prompt=True)))
            # one shift for both recipes: the same targets, padded and packed
            assert sft.collate([as_reply], 0).targets[0].tolist() == collate_pairs([pair], 0).targets[0].tolist()
            assert sft.collate_packed([as_reply]).targets[0].tolist() == collate_pairs_packed([pair]).targets[0, : len(pair.chosen)].tolist()
            checked += 1
    return checked


def test_llama3_sft_and_dpo_train_the_same_tokens(llama3, conversations):
    chat = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    assert same_tokens_on_every_turn(llama3, chat, conversations) >= 24
    pair, chosen = dpo_chosen(llama3, chat, conversations[0][:1] + [{"role": "user", "content": "Hi."}], " Meh. ")
    assert llama3.decode(trained(chosen)) == "Meh.<|eot_id|>"  # the template strips content; eot trains


def test_chatml_sft_and_dpo_train_the_same_tokens(smollm2_dir, conversations):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    chat = ChatTemplate.for_tokenizer(tok)
    assert same_tokens_on_every_turn(tok, chat, conversations[:6]) >= 12
    _, chosen = dpo_chosen(tok, chat, [{"role": "user", "content": "Hi."}], "Meh.")
    # <|im_end|> trains; the newline ChatML writes after it is never generated, so it is not there
    assert tok.decode(trained(chosen)) == "Meh.<|im_end|>" and chosen.input_ids[-1] == tok.encode("<|im_end|>")[0]


# A template whose generation prompt ends in a space: "assistant: " + "hello" is one token
# ("Ġhello") when the whole text is tokenized, so the prompt's tokens are not a prefix of it.
SPACED = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_prompt_that_merges_with_the_reply_trains_the_reply_tokens(llama3):
    chat = ChatTemplate(SPACED)
    prompt = [{"role": "user", "content": "hi"}]
    # OpenRLHF's texts (DESIGN of the reference): the prompt rendered with a generation prompt,
    # the response = render(prompt + response) minus the prompt, newlines stripped, eos added;
    # the prompt's token count = the tokens of the prompt text alone.
    prompt_text = chat.render(prompt, add_generation_prompt=True)
    response_text = chat.render(prompt + [{"role": "assistant", "content": "hello"}])[len(prompt_text):]
    assert (prompt_text, response_text) == ("user: hi\nassistant: ", "hello\n")
    prompt_ids = llama3.encode(prompt_text)
    end = end_of_turn_id(llama3, chat)  # the template writes no end token: the tokenizer's eos
    assert end == llama3.eos_ids[0]

    pair, chosen = dpo_chosen(llama3, chat, prompt, "hello")
    # the prompt is exactly its own tokens and its count is OpenRLHF's; the trained tokens are
    # exactly the response text's, then the end token: "hello" is trained, no prompt token is
    assert pair.prompt_len == len(prompt_ids) and chosen.input_ids[: pair.prompt_len] == prompt_ids
    assert trained(chosen) == llama3.encode("hello") + [end] == chosen.input_ids[pair.prompt_len :]
    assert llama3.decode(trained(chosen)) == response_text.rstrip("\n") + "<|end_of_text|>"
    # SFT of the same conversation trains the same tokens (it used to refuse it)
    sft_example = sft.make_example(Row({"prompt": prompt, "reply": "hello"}, "c"), llama3, chat, OUTPUT_KEY)
    assert sft_example == chosen

    # Why the text is tokenized in pieces: in one piece the prompt's last token (" ") is merged
    # into "Ġhello", so counting the prompt's tokens into the whole text would start training
    # one token late and never train "hello" (tokenize_conversation, which tokenizes the whole
    # text, refuses this conversation for that reason).
    whole = llama3.encode(prompt_text + "hello")
    assert whole[len(prompt_ids) - 1] == llama3.encode(" hello")[0] and len(whole) == len(prompt_ids)
    with pytest.raises(TemplateError, match="tokens are not prefix-stable"):
        tokenize_conversation(llama3, prompt + [{"role": "assistant", "content": "hello"}], chat)
