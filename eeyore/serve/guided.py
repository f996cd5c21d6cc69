"""Constrained decoding for `response_format`: replies that are JSON, following a JSON Schema.

`compile_format` turns a request's `response_format` into a `Node` tree (or refuses it with a
one-line `GuidedError`); the engine gives each guided row a `Guide`, which after every token
says which tokens may come next, as a boolean mask the sampler applies (-inf elsewhere) before
its processors, so temperature, top-p and penalties still choose among the allowed tokens.

The reply is walked by a generator (`_value`) that yields one operation at a time:
  - `Lit(candidates)`: one of a few fixed strings (keys and punctuation, enum values, true /
    false / null). Each candidate is encoded once by the tokenizer; the allowed tokens are the
    next token of every candidate still matching, so a single candidate is forced token by token.
    Should one candidate's tokens be a prefix of another's, the shorter one wins.
  - `Str(max_len)`: free text inside a string, up to `max_len` characters, then the closing quote.
    The allowed tokens are a mask computed once per tokenizer: tokens whose text holds no quote,
    backslash or control character (and that are not special tokens, nor partial characters).
  - `Num(...)`: the digits of an integer within bounds, then one of the strings that may follow
    it (a number has no closing delimiter of its own).
Properties are emitted in schema order; an optional one may be emitted or skipped (the choice
is a `Lit` among the keys that may come next). Numbers are emitted as integers, and a bounded
range of at most `guided_schema.SMALL_RANGE` values is chosen like an enum. After the root value only an end of
text token may follow. A reply cut by max_tokens ends with finish reason "length" and may be
incomplete JSON, as in vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .guided_schema import GuidedError, Node, compile_format  # noqa: F401 (compile_format: re-exported)

DEFAULT_MAX_STRING = 400  # characters of a free string without maxLength
MAX_KEY = 64  # characters of a key in a `json_object` reply
MAX_MEMBERS = 32  # members of a `json_object` object, items of an array without maxItems
MAX_DEPTH = 4  # nesting of a `json_object` reply


@dataclass(frozen=True)
class Lit:
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Str:
    max_len: int


@dataclass(frozen=True)
class Num:
    lo: int | None
    hi: int | None
    prefix: str  # digits or sign already emitted by a Lit (json_object values)
    follow: tuple[str, ...] | None  # None: the number is the whole reply


# ----------------------------------------------------------------------------- the walk


def _after(follow: tuple[str, ...] | None):
    """Choose what follows a value; None at the end of the reply."""
    if follow is None:
        return None
    return (yield Lit(follow))


def _value(node: Node, lead: str, follow: tuple[str, ...] | None):
    """Emit one value of `node` (after `lead`, a space or nothing), then one of `follow`;
    returns the index of the follow string chosen."""
    if node.enum is not None:
        values = [lead + json.dumps(v, ensure_ascii=False) for v in node.enum]
        if follow is None:
            yield Lit(tuple(values))
            return None
        # value and follow as one string, so a number enum (" 1" vs " 10") is never ambiguous
        k = yield Lit(tuple(v + f for v in values for f in follow))
        return k % len(follow)
    if node.kind == "string":
        yield Lit((lead + '"',))
        yield Str(node.max_length if node.max_length is not None else DEFAULT_MAX_STRING)
        return (yield from _after(follow))
    if node.kind == "integer":
        if lead:
            yield Lit((lead,))
        return (yield Num(node.lo, node.hi, "", follow))
    if node.kind == "object":
        return (yield from _object(node, lead, follow))
    if node.kind == "array":
        return (yield from _array(node, lead, follow))
    if node.kind == "free_object":
        return (yield from _free_object(node.depth, lead, follow))
    return (yield from _any(node.depth, follow))


def _members(node: Node, start: int, first: bool) -> list[tuple[str, int | None]]:
    """The keys that may come next from property `start` on (optional ones up to the next
    required one), and the closing brace when no required property is left."""
    sep = "" if first else ", "
    out: list[tuple[str, int | None]] = []
    for j in range(start, len(node.properties)):
        name, _, required = node.properties[j]
        out.append((sep + json.dumps(name, ensure_ascii=False) + ":", j))
        if required:
            return out
    return out + [("}", None)]


def _object(node: Node, lead: str, follow: tuple[str, ...] | None):
    yield Lit((lead + "{",))
    choices = _members(node, 0, True)
    j = choices[(yield Lit(tuple(c for c, _ in choices)))][1]
    while j is not None:
        choices = _members(node, j + 1, False)
        k = yield from _value(node.properties[j][1], " ", tuple(c for c, _ in choices))
        j = choices[k][1]
    return (yield from _after(follow))


def _array(node: Node, lead: str, follow: tuple[str, ...] | None):
    if node.max_items == 0:
        yield Lit((lead + "[]",))
        return (yield from _after(follow))
    if node.min_items == 0:
        if (yield Lit((lead + "[]", lead + "["))) == 0:
            return (yield from _after(follow))
    else:
        yield Lit((lead + "[",))
    count, most = 0, node.max_items if node.max_items is not None else MAX_MEMBERS
    while True:
        count += 1
        nxt = (",",) if count < node.min_items else ("]",) if count >= most else (",", "]")
        k = yield from _value(node.items, "" if count == 1 else " ", nxt)
        if nxt[k] == "]":
            return (yield from _after(follow))


def _free_object(depth: int, lead: str, follow: tuple[str, ...] | None):
    """Any JSON object (`json_object`): free keys, values of any kind."""
    yield Lit((lead + "{",))
    return (yield from _any_rest("{", depth, follow))


_SCALAR_START = ('"', "true", "false", "null", "-", *"0123456789")


def _any(depth: int, follow: tuple[str, ...] | None, lead: str = "", close: str | None = None):
    """Any JSON value (objects and arrays only below MAX_DEPTH), then one of `follow`. With
    `close`, that string may come instead of the value (an empty array's "]"): then -1."""
    starts = _SCALAR_START + (("{", "[") if depth < MAX_DEPTH else ())
    options = tuple(lead + s for s in starts) + ((close,) if close else ())
    k = yield Lit(options)
    if k == len(starts):
        return -1
    return (yield from _any_rest(starts[k], depth, follow))


def _any_rest(start: str, depth: int, follow: tuple[str, ...] | None):
    """The rest of a value whose first characters `start` are out."""
    if start == '"':
        yield Str(DEFAULT_MAX_STRING)
    elif start == "{":
        k, count = (yield Lit(('"', "}"))), 0
        while k == 0:
            yield Str(MAX_KEY)
            yield Lit((":",))
            count += 1
            nxt = (', "', "}") if count < MAX_MEMBERS else ("}",)
            k = 1 if nxt[(yield from _any(depth + 1, nxt, " "))] == "}" else 0
    elif start == "[":
        count = 0
        while True:
            count += 1
            nxt = (",", "]") if count < MAX_MEMBERS else ("]",)
            k = yield from _any(depth + 1, nxt, "" if count == 1 else " ", "]" if count == 1 else None)
            if k == -1 or nxt[k] == "]":
                break
    elif start not in ("true", "false", "null"):  # a number
        return (yield Num(None, None, start, follow))
    return (yield from _after(follow))


# ----------------------------------------------------------------------------- the tokens


class JsonVocab:
    """What a tokenizer's tokens are as JSON text, computed once per engine: the tokens free
    string text may use, their lengths, the digit tokens, and each fixed string's encoding."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        n = min(tokenizer.vocab_size, vocab_size)
        texts = tokenizer.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        special = set(tokenizer.backend.get_added_tokens_decoder()) if hasattr(
            tokenizer.backend, "get_added_tokens_decoder") else set()
        self.size, self.encode_text = vocab_size, tokenizer.encode
        self._encodings: dict[str, tuple[int, ...]] = {}
        self.safe = torch.zeros(vocab_size, dtype=torch.bool)
        self.length = torch.zeros(vocab_size, dtype=torch.long)
        safe = [i for i, t in enumerate(texts) if i not in special and _string_safe(t)]
        self.safe[safe] = True
        self.length[:n] = torch.tensor([len(t) for t in texts], dtype=torch.long)
        self.quote = self.encoding('"')
        if len(self.quote) != 1:
            raise GuidedError("this tokenizer has no single token for '\"': constrained decoding needs one")
        self.quote = self.quote[0]
        self.safe_or_quote = self.safe.clone()
        self.safe_or_quote[self.quote] = True
        self.longest = int(self.length[self.safe].max()) if safe else 0
        # digit tokens (ASCII only: "²" is a digit to str.isdigit) and the minus sign
        self.digits = [(i, t) for i, t in enumerate(texts) if i not in special and t.isascii() and t.isdigit()]
        self.minus = [i for i, t in enumerate(texts) if t == "-" and i not in special]
        self.eos = torch.zeros(vocab_size, dtype=torch.bool)
        self.eos[[e for e in eos_ids if 0 <= e < vocab_size]] = True
        # after the reply: an end of text token (anything, should the model have none)
        self.end = self.eos if bool(self.eos.any()) else torch.ones(vocab_size, dtype=torch.bool)

    def encoding(self, text: str) -> tuple[int, ...]:
        ids = self._encodings.get(text)
        if ids is None:
            ids = self._encodings[text] = tuple(self.encode_text(text))
        return ids

    def of(self, ids: Any) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[list(ids)] = True
        return mask


def _string_safe(text: str) -> bool:
    """Text a JSON string may hold as it is: no quote, backslash, control character, nor the
    replacement character a partial UTF-8 sequence decodes to; not empty (special tokens)."""
    return bool(text) and not any(c in '"\\\ufffd' or ord(c) < 0x20 for c in text)


# ----------------------------------------------------------------------------- the driver


class _Choice:
    """A `Lit` in progress: the candidates whose encodings still match the tokens so far."""

    def __init__(self, candidates: tuple[str, ...], vocab: JsonVocab) -> None:
        self.seqs = [vocab.encoding(c) for c in candidates]
        self.alive = [i for i, s in enumerate(self.seqs) if s]
        self.pos = 0

    def next_ids(self) -> set[int]:
        return {self.seqs[i][self.pos] for i in self.alive}

    def advance(self, token: int) -> int | None:
        """The chosen candidate's index once one is complete, else None."""
        self.alive = [i for i in self.alive if self.seqs[i][self.pos] == token]
        if not self.alive:
            raise ValueError(f"token {token} is not allowed here")
        self.pos += 1
        done = [i for i in self.alive if len(self.seqs[i]) == self.pos]
        return done[0] if done else None


class Guide:
    """One row's constraint: `allowed()` / `mask()` the tokens allowed next, `advance(token)`
    after each."""

    def __init__(self, node: Node, vocab: JsonVocab) -> None:
        self.vocab = vocab
        self.walk = _value(node, "", None)
        self.done = False
        self._send(None)

    def _send(self, value: Any) -> None:
        try:
            self.op = self.walk.send(value)
        except StopIteration:
            self.done, self.op = True, None
            return
        self.choice = _Choice(self.op.candidates, self.vocab) if isinstance(self.op, Lit) else None
        self.count, self.text = 0, getattr(self.op, "prefix", "")
        if isinstance(self.op, Num) and self.op.follow is not None:
            self.follow = _Choice(self.op.follow, self.vocab)
        self.in_follow = False

    def mask(self) -> torch.Tensor:
        allowed = self.allowed()
        return allowed if isinstance(allowed, torch.Tensor) else self.vocab.of(allowed)

    def allowed(self) -> torch.Tensor | list[int]:
        """The tokens allowed next: a boolean mask over the vocabulary, or (the common case of
        keys, punctuation and enums: a few tokens) their ids."""
        v = self.vocab
        if self.done:
            return v.end
        if self.choice is not None:
            return list(self.choice.next_ids())
        if isinstance(self.op, Str):
            room = self.op.max_len - self.count
            if room >= v.longest:
                return v.safe_or_quote
            mask = v.safe & (v.length <= room)
            mask[v.quote] = True
            return mask
        return self._number_mask()

    def advance(self, token: int) -> None:
        if self.done:
            return
        if self.choice is not None:
            k = self.choice.advance(token)
            if k is not None:
                self._send(k)
        elif isinstance(self.op, Str):
            if token == self.vocab.quote:
                self._send(None)
            elif bool(self.vocab.safe[token]) and self.count + int(self.vocab.length[token]) <= self.op.max_len:
                self.count += int(self.vocab.length[token])
            else:
                raise ValueError(f"token {token} is not allowed in a string here")
        else:
            self._advance_number(token)

    # numbers --------------------------------------------------------------

    def _digit_ids(self) -> list[int]:
        if self.in_follow:
            return []
        out = [i for i, t in self.vocab.digits if _feasible(self.text + t, self.op.lo, self.op.hi)]
        if not self.text and (self.op.lo is None or self.op.lo < 0):
            out += self.vocab.minus
        return out

    def _number_complete(self) -> bool:
        return _complete(self.text, self.op.lo, self.op.hi)

    def _number_mask(self) -> torch.Tensor | list[int]:
        if self.in_follow:
            return list(self.follow.next_ids())
        ids = set(self._digit_ids())
        if self._number_complete():
            if self.op.follow is None:
                return self.vocab.of(ids) | self.vocab.end
            ids |= self.follow.next_ids()
        return list(ids)

    def _advance_number(self, token: int) -> None:
        if not self.in_follow and token in set(self._digit_ids()):
            self.text += "-" if token in self.vocab.minus else dict(self.vocab.digits)[token]
            return
        if self.op.follow is None or not (self.in_follow or self._number_complete()):
            raise ValueError(f"token {token} is not allowed in a number here")
        self.in_follow = True
        k = self.follow.advance(token)
        if k is not None:
            self._send(k)


MAX_DIGITS = 15  # an integer without bounds; within float's exact range


def _feasible(text: str, lo: int | None, hi: int | None) -> bool:
    """Whether `text` (a sign and digits so far) can still grow into an integer in [lo, hi]."""
    neg = text.startswith("-")
    digits = text[1:] if neg else text
    if neg and lo is not None and lo >= 0:
        return False
    if not digits:
        return True
    if len(digits) > MAX_DIGITS or (len(digits) > 1 and digits[0] == "0") or (neg and digits == "0"):
        return False
    value = int(digits)
    for extra in range(0 if digits == "0" else MAX_DIGITS - len(digits), -1, -1):
        low, high = value * 10**extra, (value + 1) * 10**extra - 1
        if neg:
            low, high = -high, -low
        if (hi is None or low <= hi) and (lo is None or high >= lo):
            return True
    return False


def _complete(text: str, lo: int | None, hi: int | None) -> bool:
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0") or text == "-0":
        return False
    value = int(text)
    return (lo is None or value >= lo) and (hi is None or value <= hi)
