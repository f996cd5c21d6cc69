"""Preference records -> token ids -> concatenated chosen/rejected batches.

A record holds a prompt and two responses, in one of three shapes:
  - `prompt` as a message list, `chosen` / `rejected` as message lists (usually one assistant
    message) or plain strings (read as one assistant message);
  - no prompt key: `chosen` and `rejected` are whole conversations that share every message but
    the last; the shared prefix is the prompt (checked: a mismatch is an error naming the row);
  - without `--apply_chat_template`: plain strings, prompt (optionally through `input_template`)
    followed by the response text.

Tokens: each side is prompt + response made into a `tokens.Example` exactly as SFT makes a
conversation whose last turn trains (`tokens.py`): the prompt's tokens are those of the prompt
rendered with a generation prompt, the trained tokens those of the response (content and end
of turn; a response without an end token gets trailing newlines removed and the end token
appended) -- OpenRLHF's prompt / response texts, its prompt token count, its eos. Sequences are
cut to `max_len` with the last kept token forced to the end token; records whose prompt alone
has >= max_len - 2 tokens are dropped and counted, and so are records whose chosen or rejected
response is empty. Messages are read as `data.Row.messages` reads them (roles normalised or
refused, empty prompt messages dropped and counted).

The end token is the template's end of turn when that is one of the tokenizer's eos ids
(`<|eot_id|>`, ChatML's `<|im_end|>`), else the tokenizer's eos. OpenRLHF always uses the
tokenizer's eos, so with a base-model tokenizer (eos `<|end_of_text|>`) it appends that after
`<|eot_id|>`; we do not, since generation stops at the end of turn.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from eeyore.model.chat import ChatTemplate, TemplateError
from eeyore.model.tokenizer import Tokenizer

from .data import DataError, Row
from .tokens import Batch, Example, Spans, chat_tokens, collate, collate_packed, labelled, text_tokens, trained_example


@dataclass
class PreferenceFormat:
    """Where a record keeps its parts and how to turn them into text (the CLI's data flags)."""

    prompt_key: str | None = None
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    apply_chat_template: bool = False
    input_template: str | None = None  # e.g. "User: {}\nAssistant: " for raw-text prompts


@dataclass
class PreferencePair:
    chosen: list[int]  # prompt + chosen response
    rejected: list[int]  # prompt + rejected response
    prompt_len: int  # tokens of the prompt; both sequences start with them, every later token trains
    ref_logps: tuple[float, float] | None = None  # reference (chosen, rejected), when precomputed

    def examples(self) -> tuple[Example, Example]:
        """The chosen and rejected sequences with their labels (`tokens.Example`)."""
        return tuple(Example(ids, labelled(ids, [(self.prompt_len, len(ids))])) for ids in (self.chosen, self.rejected))


@dataclass
class PairBatch(Batch):
    """Chosen rows first, then rejected rows (`tokens.Batch`): one forward serves both halves."""

    ref_logps: torch.Tensor | None = None  # [2B] precomputed reference log-probs, same row order

    @property
    def pairs(self) -> int:
        return self.lengths.shape[0] // 2


def split_messages(row: Row, fmt: PreferenceFormat) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of a chat-format record.

    Empty prompt messages are dropped (and noted, as in SFT); the responses keep theirs, so that
    `record_texts` can tell an empty response from a missing one.
    """
    # a plain string is one message: the user's prompt, the assistant's response
    chosen = row.chat(fmt.chosen_key, "assistant", keep_empty=True)
    rejected = row.chat(fmt.rejected_key, "assistant", keep_empty=True)
    if fmt.prompt_key is not None:
        return row.chat(fmt.prompt_key, "user"), chosen, rejected
    # whole conversations: everything but the last message must be the same on both sides
    if len(chosen) < 2 or len(rejected) < 2:
        raise DataError(
            f"{row.where}: without --prompt_key, {fmt.chosen_key!r} and {fmt.rejected_key!r} must be whole "
            f"conversations (prompt messages + one response); got {len(chosen)} and {len(rejected)} messages"
        )
    if chosen[:-1] != rejected[:-1]:
        diff = next((j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise DataError(
            f"{row.where}: {fmt.chosen_key!r} and {fmt.rejected_key!r} do not share the prompt: they differ at "
            f"message {diff}, but all messages except the last must be identical"
        )
    return row.drop_empty(fmt.chosen_key, chosen[:-1]), chosen[-1:], rejected[-1:]


def _is_empty(response: str | list[dict[str, str]]) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not any(m["content"].strip() for m in response)


Side = tuple[list[int], Spans]  # one side of a pair: its ids and the span that trains


def record_tokens(row: Row, fmt: PreferenceFormat, tok: Tokenizer, template: ChatTemplate | None, end_id: int) -> tuple[Side, Side] | None:
    """(ids, trained span) of prompt + chosen and of prompt + rejected; None when a response is
    empty (a preference between nothing and something teaches nothing we want)."""
    if fmt.apply_chat_template:
        assert template is not None
        prompt, chosen, rejected = split_messages(row, fmt)
        if _is_empty(chosen) or _is_empty(rejected):
            return None
        sides = []
        for key, response in ((fmt.chosen_key, chosen), (fmt.rejected_key, rejected)):
            messages = prompt + row.drop_empty(key, response)
            try:
                ids, spans = chat_tokens(tok, template, messages, len(prompt), end_id)
            except TemplateError as e:
                raise DataError(f"{row.where}: {e}") from None
            if not spans:
                return None  # no assistant message in the response
            sides.append((ids, [(spans[0][0], spans[-1][1])]))  # everything after the prompt trains
        return sides[0], sides[1]
    keys = [k for k in (fmt.prompt_key, fmt.chosen_key, fmt.rejected_key) if k is not None]
    for key in keys:
        if not isinstance(row.field(key), str):
            raise DataError(
                f"{row.where}: field {key!r} must be a string without --apply_chat_template "
                f"(message lists need --apply_chat_template)"
            )
    if _is_empty(row.record[fmt.chosen_key]) or _is_empty(row.record[fmt.rejected_key]):
        return None
    prompt = row.record[fmt.prompt_key] if fmt.prompt_key else ""
    if fmt.input_template and fmt.prompt_key:
        prompt = fmt.input_template.format(prompt)
    return tuple(text_tokens(tok, prompt, row.record[key], end_id) for key in (fmt.chosen_key, fmt.rejected_key))


def tokenize_pair(chosen: Side, rejected: Side, max_len: int, end_id: int) -> PreferencePair | None:
    """The pair of two (ids, span) sides, or None when the prompt leaves no room for a response."""
    cut = [trained_example(ids, spans, max_len, end_id) for ids, spans in (chosen, rejected)]
    if cut[0] is None or cut[1] is None:
        return None
    return PreferencePair(cut[0].input_ids, cut[1].input_ids, chosen[1][0][0])


def end_of_turn_id(tokenizer: Tokenizer, template: ChatTemplate | None) -> int:
    """The token that closes an assistant turn: what the template writes after a reply if that is
    one of the tokenizer's eos ids (`<|eot_id|>`, `<|im_end|>`), else the first eos id."""
    eos = list(tokenizer.eos_ids)
    if not eos:
        raise ValueError("the tokenizer defines no end-of-sequence token; DPO sequences must end with one")
    if template is not None:
        probe = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        ids = tokenizer.encode(probe.rstrip("\n"))
        if ids and ids[-1] in eos:
            return ids[-1]
    return eos[0]


def build_pairs(
    rows: Sequence[Row],
    tokenizer: Tokenizer,
    fmt: PreferenceFormat,
    max_len: int,
    template: ChatTemplate | None = None,
    show: bool = True,
) -> tuple[list[PreferencePair], int]:
    """Tokenize every record: (pairs, how many were dropped and why: "too_long" for a prompt that
    leaves no room for a response, "empty_response")."""
    if fmt.apply_chat_template and template is None:
        template = ChatTemplate.for_tokenizer(tokenizer)
    eos_id = end_of_turn_id(tokenizer, template if fmt.apply_chat_template else None)
    pairs, dropped = [], Counter()
    for row in tqdm(rows, desc="tokenizing preference pairs", unit="pair", disable=not show):
        sides = record_tokens(row, fmt, tokenizer, template, eos_id)
        pair = None if sides is None else tokenize_pair(*sides, max_len=max_len, end_id=eos_id)
        if pair is None:
            dropped["too_long" if sides is not None else "empty_response"] += 1
        else:
            pairs.append(pair)
    return pairs, dropped


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> PairBatch:
    """Chosen then rejected sequences, right-padded into one `[2B, T]` batch (`tokens.collate`)."""
    return _pair_batch(collate(_examples(pairs), pad_id), pairs)


def collate_pairs_packed(pairs: list[PreferencePair]) -> PairBatch:
    """`--packing_samples`: chosen then rejected sequences end to end in one row (`tokens.collate_packed`)."""
    return _pair_batch(collate_packed(_examples(pairs)), pairs)


def _examples(pairs: list[PreferencePair]) -> list[Example]:
    sides = [p.examples() for p in pairs]
    return [chosen for chosen, _ in sides] + [rejected for _, rejected in sides]


def _pair_batch(batch: Batch, pairs: list[PreferencePair]) -> PairBatch:
    ref = None
    if all(p.ref_logps is not None for p in pairs):
        ref = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32)
    return PairBatch(batch.input_ids, batch.targets, batch.lengths, batch.packed, ref)
