"""Structured client profiles from real conversations: `python -m eeyore.data.extract_profiles`.

For each conversation ONE chat request asks a model (any OpenAI-compatible endpoint; the
project's own server by default) for the client's whole profile as a JSON object: `profile` in
the schema of `eeyore.profile` and `evidence`, a quote for each field it fills in. The JSON
Schema goes along as `response_format` while the endpoint accepts it (ours, vLLM and OpenAI
then follow it by constrained decoding, so every reply is schema-valid JSON unless max_tokens
cuts it); an endpoint that answers 400 to it gets the same request without it, and the prompt
alone describes the schema (`eeyore.serve.structured`). The reply is validated with `eeyore.profile.profile_errors`; an invalid
reply is sent back with its errors quoted, up to `--attempts` requests in all; a conversation
that never yields a valid profile goes to the rejects file with the reason for each attempt.

Output: one JSON line per conversation, appended and synced as it finishes, so an interrupted
run loses nothing and a rerun skips every conversation already in the output or the rejects.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eeyore.profile import (
    DISTORTION_LEVELS, DISTORTION_NAMES, DISTORTIONS, FIELD_NOTES, FIELDS, SYMPTOM_LEVELS, SYMPTOM_NAMES, SYMPTOMS,
    UNKNOWN, json_schema, profile_errors,
)
from eeyore.serve.client import ChatClient, EndpointError, Sampling
from eeyore.serve.structured import accepts_format, chat_formatted
from eeyore.train.data import DataError

from .conversations import Conversation, append_record, load_conversations, read_records, write_jsonl_atomic

DEFAULT_URL = "http://127.0.0.1:6416/v1"  # `python -m eeyore.serve`
CLIENT, COUNSELLOR = "Client", "Supporter"
QUOTE_CHARS, TEXT_CHARS, SITUATION_CHARS = 200, 160, 500  # caps on free text: see capped_schema


def capped_schema() -> dict[str, Any]:
    """The profile's JSON Schema with a maxLength on every free-text field, so that under
    constrained decoding a weak model that rambles still closes each string, and the whole
    reply fits in --max-tokens (a reply cut short is no JSON at all)."""
    schema = json_schema()

    def cap(node: dict[str, Any], chars: int) -> None:
        if node.get("type") == "string" and "enum" not in node:
            node["maxLength"] = chars
        for name, sub in node.get("properties", {}).items():
            cap(sub, SITUATION_CHARS if name == "situation of the client" else chars)

    cap(schema["properties"]["profile"], TEXT_CHARS)
    cap(schema["properties"]["evidence"], QUOTE_CHARS)
    return schema


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "client_profile", "schema": capped_schema()}}


def instructions() -> str:
    """The system message: the task and the schema in words (all a model has when the endpoint
    takes no response_format)."""
    def choices(levels: tuple[str, ...]) -> str:
        return ", ".join(levels[:-1]) + " or " + levels[-1]

    lines = [
        f"You read a conversation between a person who is struggling ({CLIENT}) and someone supporting them "
        f"({COUNSELLOR}), and write down the {CLIENT.lower()}'s profile as one JSON object with two keys.",
        '"profile" holds every field below, spelled exactly as here. Use only what the conversation shows: '
        f'a free-text field it says nothing about is "{UNKNOWN}", a symptom or distortion it does not show is '
        '"Not exhibited".',
        '"evidence" mirrors "profile": for each field you filled in (not unknown, not "Not exhibited") a short '
        f"quote of the {CLIENT.lower()}'s own words that shows it; the symptom and distortion quotes are objects "
        "keyed like the profile's.",
        "Fields of \"profile\":",
        *(f'- "{name}": {FIELD_NOTES[name]}' for name in FIELDS if name in FIELD_NOTES),
        f'- "{SYMPTOMS}": an object with each of these keys, valued {choices(SYMPTOM_LEVELS)}:',
        *(f'  - "{name}"' for name in SYMPTOM_NAMES),
        f'- "{DISTORTIONS}": an object with each of these keys, valued {choices(DISTORTION_LEVELS)}:',
        *(f'  - "{name}"' for name in DISTORTION_NAMES),
        "Reply with the JSON object only.",
    ]
    return "\n".join(lines)


def transcript(conv: Conversation) -> str:
    turns = [f"{CLIENT if m['role'] == conv.client_role else COUNSELLOR}: {m['content'].strip()}" for m in conv.messages]
    return "CONVERSATION:\n" + "\n".join(turns)


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def read_reply(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(the record {"profile", "evidence"}, []) for a valid reply, else (None, what is wrong)."""
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text.strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return None, [f"the reply is not valid JSON ({e})"]
    if not isinstance(data, dict):
        return None, [f"the reply must be a JSON object, got {type(data).__name__}"]
    errors = [f"unknown key {k!r} (the object has 'profile' and 'evidence')" for k in data if k not in ("profile", "evidence")]
    record = {"profile": data.get("profile"), "evidence": data.get("evidence", {})}
    errors += profile_errors(record)
    return (None, errors) if errors else (record, [])


@dataclass
class Outcome:
    record: dict[str, Any] | None  # the valid profile record, or None when rejected
    reasons: list[str] = field(default_factory=list)  # what went wrong, attempt by attempt
    last_reply: str = ""


class Extractor:
    """Runs the requests of one conversation; remembers whether the endpoint takes a JSON schema."""

    def __init__(self, client: ChatClient, sampling: Sampling, attempts: int):
        self.client, self.sampling, self.attempts = client, sampling, attempts

    @property
    def schema_ok(self) -> bool | None:
        """Whether the endpoint takes the JSON schema; None: not known yet."""
        return accepts_format(self.client)

    async def _ask(self, messages: list[dict[str, str]]) -> str:
        return await chat_formatted(self.client, messages, self.sampling, RESPONSE_FORMAT)

    async def extract(self, conv: Conversation) -> Outcome:
        if not conv.client_turns():
            return Outcome(None, [f"no message in the client role {conv.client_role!r}"])
        base = [{"role": "system", "content": instructions()}, {"role": "user", "content": transcript(conv)}]
        messages, out = base, Outcome(None)
        for _ in range(self.attempts):
            try:
                reply = await self._ask(messages)
            except EndpointError as e:
                out.reasons.append(str(e))
                messages = base
                continue
            out.last_reply = reply
            record, errors = read_reply(reply)
            if record is not None:
                out.record = record
                return out
            out.reasons.append("; ".join(errors))
            feedback = ("That reply does not follow the schema: " + "; ".join(errors)[:2000] +
                        ". Answer again with the whole corrected JSON object only.")
            messages = [*base, {"role": "assistant", "content": reply}, {"role": "user", "content": feedback}]
        return out


def output_record(conv: Conversation, out: Outcome, model: str) -> dict[str, Any]:
    keep = {k: conv.record[k] for k in ("source", "id_source") if k in conv.record}
    return {"conversation_id": conv.id, "source_row": conv.row, **keep, **out.record, "model": model,
            "attempts": len(out.reasons) + 1}


def reject_record(conv: Conversation, out: Outcome) -> dict[str, Any]:
    return {"conversation_id": conv.id, "source_row": conv.row, "reason": out.reasons[-1] if out.reasons else "",
            "reasons": out.reasons, "last_reply": out.last_reply[:4000]}


def rejects_path(args: argparse.Namespace) -> Path:
    return args.rejects or args.output.with_name(args.output.stem + ".rejects.jsonl")


def pending(convs: list[Conversation], args: argparse.Namespace) -> list[Conversation]:
    """The conversations an earlier run has not finished (with --retry-rejected, its rejects too:
    they leave the rejects file first, so none is listed twice)."""
    done = {r.get("conversation_id") for r in read_records(args.output)}
    rejects = read_records(rejects_path(args))
    if args.retry_rejected and rejects:
        write_jsonl_atomic(rejects_path(args), [])
        rejects = []
    done |= {r.get("conversation_id") for r in rejects}
    return [c for c in convs if c.id not in done]


@dataclass
class RunStats:
    written: int = 0  # profiles
    rejected: int = 0  # conversations
    requests: int = 0  # answered requests
    completion_tokens: int = 0


async def run(args: argparse.Namespace) -> RunStats:
    """Extract every pending conversation."""
    convs = load_conversations(args.conversations, args.messages_key, args.client_role, args.max_samples)
    todo = pending(convs, args)
    print(f"{len(convs)} conversations, {len(convs) - len(todo)} done by an earlier run, {len(todo)} to extract",
          file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    client = ChatClient(args.base_url, args.model, api_key=args.api_key, max_connections=args.concurrency,
                        retries=args.retries)
    extractor = Extractor(client, Sampling(temperature=args.temperature, max_tokens=args.max_tokens), args.attempts)
    gate = asyncio.Semaphore(args.concurrency)
    stats = RunStats()
    bar = tqdm(total=len(convs), initial=len(convs) - len(todo), desc="profiles", unit="conv")

    async def one(conv: Conversation, sink, rejects) -> None:
        async with gate:
            out = await extractor.extract(conv)
        if out.record is not None:
            append_record(sink, output_record(conv, out, args.model))
            stats.written += 1
        else:
            append_record(rejects, reject_record(conv, out))
            stats.rejected += 1
            tqdm.write(f"rejected {conv.id} ({conv.where}): {out.reasons[-1] if out.reasons else 'no reason'}"[:400])
        bar.update(1)

    try:
        with args.output.open("a", encoding="utf-8") as sink, rejects_path(args).open("a", encoding="utf-8") as rejects:
            await asyncio.gather(*(one(c, sink, rejects) for c in todo))
    finally:
        bar.close()
        await client.close()
    stats.requests, stats.completion_tokens = client.requests, client.completion_tokens
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eeyore.data.extract_profiles",
        description="Extract each client's structured profile from real conversations with an LLM, one "
        "request per conversation, validated against the profile schema.",
    )
    p.add_argument("conversations", help="conversations: a .json/.jsonl/.parquet file or folder of records with a messages list")
    p.add_argument("--output", required=True, type=Path, help="profiles, one JSON line per conversation (appended: a rerun resumes)")
    p.add_argument("--rejects", type=Path, default=None, help="conversations without a valid profile, with reasons (default: OUTPUT's name + .rejects.jsonl)")
    p.add_argument("--retry-rejected", action="store_true", help="extract the conversations of the rejects file again (default: skip them)")
    p.add_argument("--messages-key", default="messages", help="field holding the messages (records with 'conversation' are read too) (default: %(default)s)")
    p.add_argument("--client-role", default="assistant", help="the role the client speaks in; every other non-system role is the counsellor (default: %(default)s)")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N conversations (default: all)")
    p.add_argument("--base-url", default=DEFAULT_URL, help="OpenAI-compatible API base URL (default: %(default)s, where `python -m eeyore.serve` listens)")
    p.add_argument("--model", default="default", help="model name sent to the endpoint (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="bearer token for the endpoint (default: none)")
    p.add_argument("--attempts", type=int, default=3, help="requests per conversation before it is rejected (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries of one request on a transient HTTP error (429, 5xx, timeouts) (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="conversations in flight (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=2048, help="longest reply, in tokens (default: %(default)s)")
    args = p.parse_args(argv)
    for flag in ("attempts", "concurrency", "max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.retries < 0:
        p.error("--retries must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = asyncio.run(run(args))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: every finished conversation is in {args.output}; rerun to continue", file=sys.stderr)
        return 130
    print(f"{stats.written} profiles written to {args.output}, {stats.rejected} conversations rejected "
          f"({rejects_path(args)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
