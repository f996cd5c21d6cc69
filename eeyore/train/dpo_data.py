"""Preference records -> token ids -> concatenated chosen/rejected batches.

A record holds a prompt and two responses, in one of three shapes:
  - `prompt` as a message list, `chosen` / `rejected` as message lists (usually one assistant
    message) or plain strings (read as one assistant message);
  - no prompt key: `chosen` and `rejected` are whole conversations that share every message but
    the last; the shared prefix is the prompt (checked: a mismatch is an error naming the row);
  - without `--apply_chat_template`: plain strings, prompt (optionally through `input_template`)
    followed by the response text.

Tokens, as OpenRLHF makes them: the prompt is rendered with a generation prompt; a response is
the rendering of prompt + response minus the prompt's text, with trailing newlines removed and an
end token appended when it does not already end with one. We tokenize prompt and response
separately and concatenate, so the prompt tokens are exactly those the model sees at generation
time (and the response boundary never depends on a merge across it). Sequences are cut to
`max_len` with the last kept token forced to the end token; records whose prompt alone has
>= max_len - 2 tokens are dropped and counted, and so are records whose chosen or rejected
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
from .packing import PackedLayout, pack


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
    prompt_len: int  # tokens of the prompt; both sequences start with them
    ref_logps: tuple[float, float] | None = None  # reference (chosen, rejected), when precomputed


@dataclass
class PairBatch:
    """Chosen rows first, then rejected rows, right-padded: one forward serves both halves.

    `response_mask[b, t]` marks the tokens whose log-probability counts (response content and
    its end-of-turn token); the log-prob of token t comes from the logits at t - 1.
    """

    input_ids: torch.Tensor  # [2B, T]
    response_mask: torch.Tensor  # [2B, T] bool
    lengths: torch.Tensor  # [2B] real tokens per row; the rest is padding
    ref_logps: torch.Tensor | None = None  # [2B] precomputed reference log-probs, same row order
    packed: PackedLayout | None = None  # --packing_samples: the 2B sequences lie in one row [1, S]

    @property
    def pairs(self) -> int:
        return self.lengths.shape[0] // 2

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens, for throughput."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        packed = None if self.packed is None else self.packed.to(device)
        return PairBatch(self.input_ids.to(device), self.response_mask.to(device), self.lengths.to(device), ref, packed)


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


def record_texts(row: Row, fmt: PreferenceFormat, template: ChatTemplate | None) -> tuple[str, str, str] | None:
    """(prompt text, chosen response text, rejected response text) of one record; None when a
    response is empty (a preference between nothing and something teaches nothing we want)."""
    if fmt.apply_chat_template:
        assert template is not None
        prompt, chosen, rejected = split_messages(row, fmt)
        if _is_empty(chosen) or _is_empty(rejected):
            return None
        chosen, rejected = row.drop_empty(fmt.chosen_key, chosen), row.drop_empty(fmt.rejected_key, rejected)
        try:
            prompt_text = template.render(prompt, add_generation_prompt=True)
            responses = []
            for response in (chosen, rejected):
                full = template.render(prompt + response)
                if not full.startswith(prompt_text):
                    raise TemplateError(
                        "the chat template is not prefix-stable: the prompt rendered with a generation prompt "
                        "is not a prefix of prompt + response"
                    )
                responses.append(full[len(prompt_text):])
        except TemplateError as e:
            raise DataError(f"{row.where}: {e}") from None
        return prompt_text, responses[0], responses[1]
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
    return prompt, row.record[fmt.chosen_key], row.record[fmt.rejected_key]


def tokenize_pair(tokenizer: Tokenizer, prompt: str, chosen: str, rejected: str, max_len: int, eos_id: int) -> PreferencePair | None:
    """Token ids of one pair, or None when the prompt leaves no room for a response."""
    prompt_ids = tokenizer.encode(prompt)[:max_len]
    if len(prompt_ids) >= max_len - 2:
        return None
    sequences = []
    for response in (chosen, rejected):
        ids = tokenizer.encode(response.rstrip("\n"))
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
        ids = (prompt_ids + ids)[:max_len]
        ids[-1] = eos_id  # a cut sequence still ends like a finished one
        sequences.append(ids)
    return PreferencePair(sequences[0], sequences[1], len(prompt_ids))


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
        texts = record_texts(row, fmt, template)
        pair = None if texts is None else tokenize_pair(tokenizer, *texts, max_len=max_len, eos_id=eos_id)
        if pair is None:
            dropped["too_long" if texts is not None else "empty_response"] += 1
        else:
            pairs.append(pair)
    return pairs, dropped


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> PairBatch:
    """Right-pad chosen and rejected sequences into one `[2B, T]` batch (chosen rows first).

    Right padding needs no attention mask under a causal mask: real tokens never look at the
    padding after them, and padding positions carry no loss.
    """
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompt_lens = [p.prompt_len for p in pairs] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows, prompt_lens)):
        input_ids[b, : len(row)] = torch.tensor(row)
        response_mask[b, start : len(row)] = True
    return PairBatch(input_ids, response_mask, torch.tensor([len(r) for r in rows]), _ref_logps(pairs))


def collate_pairs_packed(pairs: list[PreferencePair]) -> PairBatch:
    """`--packing_samples`: chosen then rejected sequences end to end in one row (`packing.py`).

    A sequence's first token is never scored (nothing of its own sequence precedes it), as
    position 0 of a padded row.
    """
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [max(p.prompt_len, 1) for p in pairs] * 2
    mask = pack([[False] * start + [True] * (len(row) - start) for row, start in zip(rows, starts)])
    lengths = [len(r) for r in rows]
    return PairBatch(pack(rows), mask, torch.tensor(lengths), _ref_logps(pairs), PackedLayout.of(lengths))


def _ref_logps(pairs: list[PreferencePair]) -> torch.Tensor | None:
    if not all(p.ref_logps is not None for p in pairs):
        return None
    return torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32)
