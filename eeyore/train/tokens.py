"""Which tokens are trained: one convention for SFT and DPO alike.

Every training sequence is an `Example`: `input_ids` and `labels` of the same length, with
`labels[i] = input_ids[i]` where token i is trained and IGNORE_INDEX where it is only context
(transformers' `labels=` convention, unshifted). SFT records and both sides of a DPO pair become
examples through the same three steps:

1. **Which tokens** (`chat_tokens`, `text_tokens`): ids and the `[start, end)` spans to train.
   Chat records: the template renders the conversation and `chat.assistant_turns` finds every
   assistant turn in the text (a template whose renderings do not extend each other is refused,
   naming the message). The text is cut at the boundaries of the turns that train and each
   piece is tokenized on its own, so the trained tokens are exactly the turn's, and before a
   single trained turn (DPO, SFT without --multiturn) come exactly the tokens of its rendered
   prompt, what the model is fed at generation time. A trained turn is its content and its
   end-of-turn token, through the turn's last eos-type token (ChatML's newline after
   `<|im_end|>` is never generated: it is context, and dropped after the last trained turn).
   A template that closes a turn with no eos-type token gets the turn's text without trailing
   newlines and the end token. Plain-text records: the prompt's tokens, then the response's
   without trailing newlines and with the end token appended when it does not end with it.
   Why pieces: a tokenizer may merge across a boundary (a generation prompt ending in a space,
   `"assistant: " + "hello"` -> `"Ġhello"`); counting the prompt's tokens inside one tokenization
   of the whole text would then cut the reply's first token out of training. Where every boundary
   is a special token (Llama 3's and ChatML's templates), pieces and the whole text give the same
   ids (`chat.tokenize_conversation`, which tokenizes the whole text, checks exactly that).
2. **Cutting to `max_len`** (`trained_example`): records whose last trained turn starts at or after
   max_len - 2 are dropped; longer sequences keep their first max_len tokens, the last one
   becomes the end token, trained if it falls inside a trained span.
3. **The shift** (`shift`, used by `collate` and `collate_packed`): position t predicts token
   t + 1. It is the only place training offsets predictions from ids: a batch's `targets` are
   aligned with the model's hidden states, so the losses (`loss.cross_entropy_sum`, its fused
   CUDA kernel, `loss.token_logprobs` for DPO) never shift. Each sequence is shifted on its own,
   so its last token predicts nothing and no target crosses into the next packed sequence.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from eeyore.model.chat import ChatTemplate, Message, assistant_turns
from eeyore.model.tokenizer import Tokenizer

from .loss import IGNORE_INDEX
from .packing import PackedLayout, pack

Spans = list[tuple[int, int]]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # labels[i] = input_ids[i] where token i is trained, else IGNORE_INDEX
    truncated: bool = False


def chat_tokens(
    tok: Tokenizer, chat: ChatTemplate, messages: Sequence[Message], first: int, end_id: int
) -> tuple[list[int], Spans]:
    """Ids of a conversation through its last assistant turn and the spans of the assistant
    turns to train: those of messages `first` onwards (earlier ones are context).

    The text is cut only at the trained turns (earlier assistant turns stay inside the prompt's
    piece). Raises TemplateError when the template is not prefix-stable.
    """
    text, turns = assistant_turns(chat, messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    eos = set(tok.eos_ids)
    ids: list[int] = []
    spans: Spans = []
    at = 0  # characters of `text` tokenized so far
    for start, end in (turn for i, turn in zip(assistant, turns) if i >= first):
        ids += tok.encode(text[at:start])
        turn = tok.encode(text[start:end])
        last = max((j for j, t in enumerate(turn) if t in eos), default=None)
        if last is None:  # no end token in the template's turn: the text, then the end token
            reply = text[start:end].rstrip("\n")
            trained, rest, at = tok.encode(reply) + [end_id], [], start + len(reply)
        else:
            trained, rest, at = turn[: last + 1], turn[last + 1 :], end
        spans.append((len(ids), len(ids) + len(trained)))
        ids += trained + rest
    return ids, spans


def text_tokens(tok: Tokenizer, prompt: str, response: str, end_id: int) -> tuple[list[int], Spans]:
    """Ids of a plain-text prompt and response, and the response's span (it ends with `end_id`)."""
    prompt_ids = tok.encode(prompt)
    reply = tok.encode(response.rstrip("\n"))
    if not reply or reply[-1] != end_id:
        reply.append(end_id)
    return prompt_ids + reply, [(len(prompt_ids), len(prompt_ids) + len(reply))]


def labelled(ids: list[int], spans: Spans) -> list[int]:
    """The labels of `ids`: the token where a span trains it, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def trained_example(ids: list[int], spans: Spans, max_len: int, end_id: int) -> Example | None:
    """The example of `ids` trained on `spans`, ending with the last span and cut to `max_len`;
    None when the last span starts at or after max_len - 2 (its prompt leaves no room)."""
    if spans[-1][0] >= max_len - 2:
        return None
    ids = ids[: spans[-1][1]]
    labels = labelled(ids, spans)
    if len(ids) <= max_len:
        return Example(ids, labels)
    ids, labels = ids[:max_len], labels[:max_len]
    ids[-1] = end_id  # a cut sequence still ends like a finished one
    if labels[-1] != IGNORE_INDEX:
        labels[-1] = end_id
    return Example(ids, labels, truncated=True)


def shift(labels: Sequence[int]) -> list[int]:
    """What each position predicts: the next token's label; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


@dataclass
class Batch:
    """Examples as tensors: the model reads `input_ids`, the losses read `targets` at the same positions."""

    input_ids: torch.Tensor  # [B, T] right-padded, or [1, S] packed
    targets: torch.Tensor  # same shape: the token each position predicts (`shift`), IGNORE_INDEX where none
    lengths: torch.Tensor  # [n] real tokens of each sequence; the rest of a padded row is padding
    packed: PackedLayout | None = None  # --packing_samples: where the sequences of the one row lie

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens, for throughput."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: None if v is None else v.to(device) for k, v in moved.items()})


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded rows; causal attention needs no padding mask (real tokens never look ahead)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        targets[b, : len(e.labels)] = torch.tensor(shift(e.labels))
    return Batch(input_ids, targets, torch.tensor([len(e.input_ids) for e in examples]))


def collate_packed(examples: Sequence[Example]) -> Batch:
    """`--packing_samples`: every example end to end in one row (`packing.py`), targets as `collate`'s."""
    lengths = [len(e.input_ids) for e in examples]
    input_ids, targets = pack([e.input_ids for e in examples]), pack([shift(e.labels) for e in examples])
    return Batch(input_ids, targets, torch.tensor(lengths), PackedLayout.of(lengths))
