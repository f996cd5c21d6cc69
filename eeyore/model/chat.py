"""Chat templates (HF jinja convention) and the assistant spans that training learns from.

A template renders a list of `{"role", "content"}` messages to one string that the tokenizer
encodes (special tokens written in it are parsed as special). Templates come from checkpoints,
so they render in jinja's immutable sandbox.

Assistant spans are found the way the reference (OpenRLHF) finds them: render the messages up to
each assistant message with a generation prompt, then up to and including it; the token counts
of the two renderings bound the assistant's tokens. That is only right when rendering more
messages never changes the text (or tokens) of the earlier ones, so both are checked.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer

# The template the reference trained with: no system preamble, content stripped, bos once.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"llama3": LLAMA3_TEMPLATE}

Message = dict[str, Any]


class TemplateError(ValueError):
    """A chat template that does not parse, fails to render, or is not prefix-stable."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON like HF's.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled jinja chat template with the tokenizer's bos/eos strings bound."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from None

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer, override: str | None = None) -> "ChatTemplate":
        """The override (a name in NAMED_TEMPLATES, a .jinja file, or template source), else the
        tokenizer's own template."""
        source = override if override is not None else tok.chat_template
        if source is None:
            raise TemplateError(
                f"{tok.source} has no chat template: pass one (e.g. 'llama3' or a .jinja file) explicitly"
            )
        if source in NAMED_TEMPLATES:
            source = NAMED_TEMPLATES[source]
        elif "{" not in source and source.endswith(".jinja"):
            path = Path(source).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"chat template file {path} does not exist")
            source = path.read_text()
        eos = tok.eos_tokens[0] if tok.eos_tokens else ""
        return cls(source, bos_token=tok.bos_token or "", eos_token=eos)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False, **variables: Any) -> str:
        _check_messages(messages)
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **variables,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed to render: {exc}") from None

    def render_prompt(self, messages: Sequence[Message], continue_final: bool = False) -> str:
        """The prompt a model generates from: a new assistant turn, or, with `continue_final`, the
        final assistant message left open (without its end of turn) so generation continues it."""
        if not continue_final:
            return self.render(messages, add_generation_prompt=True)
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("continue_final needs the last message to be an assistant message")
        text = self.render(messages)
        content = messages[-1]["content"]
        for candidate in (content, content.strip()):  # templates often strip the content
            cut = text.rfind(candidate) if candidate else -1
            if cut >= 0:
                return text[: cut + len(candidate)]
        raise TemplateError("the chat template does not write the final assistant message's content verbatim")


def _check_messages(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] ({message['role']}) must have a string 'content'")


def assistant_turns(chat: ChatTemplate, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered up to its last assistant turn, and the `[start, end)` characters
    of every assistant turn in that text: from the end of its generation prompt to the end of
    the turn as the template renders it. Messages after the last assistant turn are dropped.

    Raises TemplateError, naming the message, when the renderings do not extend each other
    (the template is not prefix-stable), so that no turn can be located in the text.
    """
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if assistant:
        messages = messages[: assistant[-1] + 1]
    text = chat.render(messages)
    turns = []
    for i in assistant:
        prompt = chat.render(messages[:i], add_generation_prompt=True)
        turn = chat.render(messages[: i + 1])
        if not turn.startswith(prompt) or not text.startswith(turn):
            raise TemplateError(
                f"chat template is not prefix-stable at message {i} (assistant): rendering messages[:{i}] "
                f"with a generation prompt, then messages[:{i + 1}], then the whole conversation does not "
                "give texts that extend each other, so assistant tokens cannot be located"
            )
        turns.append((len(prompt), len(turn)))
    return text, turns


def tokenize_conversation(
    tok: Tokenizer, messages: Sequence[Message], template: ChatTemplate | str | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole rendered conversation in one piece (what `apply_chat_template`
    tokenizes) and the `[start, end)` span of every assistant turn.

    A span covers the turn's content and its end-of-turn token; anything a template writes after
    the last eos-type token of the turn (ChatML's newline after `<|im_end|>`) is left out, since
    generation stops at that token. Messages after the last assistant turn are dropped. A
    conversation without an assistant turn gives no spans. Raises TemplateError, naming the
    message, when the template or its tokens are not prefix-stable. (Training tokenizes each
    piece on its own instead, so that its tokens never depend on a merge across a turn's
    boundary: `eeyore.train.tokens`.)
    """
    chat = template if isinstance(template, ChatTemplate) else ChatTemplate.for_tokenizer(tok, template)
    text, turns = assistant_turns(chat, messages)
    ids = tok.encode(text)
    eos = set(tok.eos_ids)
    spans = []
    for (start_char, end_char), i in zip(turns, [i for i, m in enumerate(messages) if m.get("role") == "assistant"]):
        prompt_ids, turn_ids = tok.encode(text[:start_char]), tok.encode(text[:end_char])
        start, end = len(prompt_ids), len(turn_ids)
        if ids[:start] != prompt_ids or ids[:end] != turn_ids:
            raise TemplateError(
                f"tokens are not prefix-stable at message {i} (assistant): the text before or after "
                "this turn tokenizes differently inside the whole conversation"
            )
        last_eos = max((j for j in range(start, end) if ids[j] in eos), default=end - 1)
        spans.append((start, last_eos + 1))
    return ids, spans
