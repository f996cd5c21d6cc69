"""Generated ids to text deltas, with stop strings matched across token boundaries.

The tokenizer's stream decoder never yields half a UTF-8 character. On top of it we hold back
any tail of the text that could still grow into a stop string, so a stop string split over
several tokens is cut out whole and never half-shown to a streaming client.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class StreamDecoder(Protocol):
    def step(self, token_id: int) -> str: ...


class TextStream:
    """`decode` turns the ids the stream decoder still holds (an unfinished character) into text
    when the stream ends, so the whole stream adds up to decoding all its ids at once."""

    def __init__(self, decoder: StreamDecoder, stop: Sequence[str] = (),
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.decoder, self.decode = decoder, decode
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded text not yet released: a possible start of a stop string
        self.undecoded: list[int] = []  # ids since the decoder last produced text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text that is safe to release after this token, and whether a stop string was hit
        (the text then ends just before it, and the stream is over)."""
        new = self.decoder.step(token_id)
        self.undecoded = [] if new else self.undecoded + [token_id]
        text = self.pending + new
        if not self.stop:
            self.pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        keep = self._partial_tail(text)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, when the stream ends for another reason than a stop string."""
        text, self.pending = self.pending, ""
        if self.undecoded and self.decode is not None:
            text += self.decode(self.undecoded)
        self.undecoded = []
        return text

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
