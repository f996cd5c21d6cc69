"""SFT records from conversations and their extracted profiles: `python -m eeyore.data.build_sft`.

Each kept conversation becomes one training record: `messages` = the system prompt rendered from
its profile exactly as training renders it (`render_system_prompt(profile, "train")`), then the
turns with the client as `assistant` and the counsellor as `user`; the record keeps its
`conversation_id` and `profile` (which `make_preferences` reads). Filters: `--min-turns` client
turns, `--require-trait` (a trait the profile must have), and `--max-tokens` as the model's
tokenizer and chat template count the record in training. Writes DIR/train.jsonl (what
`eeyore.train.sft --input_key messages --apply_chat_template --multiturn` reads) and the data
card DIR/README.md with its charts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eeyore.profile import Profile, render_system_prompt, traits
from eeyore.train.data import DataError

from .conversations import Conversation, load_conversations, load_profile_records, write_atomic, write_jsonl_atomic
from .datacard import card, charts, distributions


def has_traits(fields: dict[str, Any], wanted: list[str]) -> str | None:
    """The first of `wanted` the profile lacks, or None. A wanted trait is a class (mild, moderate,
    severe, distortion, overall) or a symptom / distortion name, case-insensitive."""
    found = traits(Profile({"profile": fields}, 0, ""))
    have = {t.category for t in found} | {t.name.lower() for t in found}
    return next((w for w in wanted if w.lower() not in have), None)


def record_of(conv: Conversation, profile: dict[str, Any]) -> dict[str, Any]:
    system = {"role": "system", "content": render_system_prompt(profile["profile"], "train")}
    return {"messages": [system, *conv.as_training()], "conversation_id": conv.id, "profile": profile["profile"]}


class TokenCounter:
    """Tokens of a record as SFT trains it: the chat template's rendering up to the end of the last
    client turn, with the model's own tokenizer."""

    def __init__(self, tokenizer: str | None, template: str | None):
        from eeyore.model.chat import ChatTemplate
        from eeyore.model.tokenizer import Tokenizer

        if tokenizer is None:
            from eeyore.model.convert import ensure_default_model

            tokenizer = str(ensure_default_model())
        self.tok = Tokenizer.from_pretrained(tokenizer)
        self.chat = ChatTemplate.for_tokenizer(self.tok, template)

    def __call__(self, messages: list[dict[str, str]]) -> int:
        from eeyore.model.chat import tokenize_conversation

        ids, spans = tokenize_conversation(self.tok, messages, self.chat)
        return spans[-1][1] if spans else len(ids)


def build(convs: list[Conversation], profiles: dict[str, dict], args: argparse.Namespace, count_tokens) -> tuple[list[dict], dict[str, int], list[int], list[int]]:
    """(records kept, counts by outcome, client turns and tokens of each kept record)."""
    counts = {"conversations": len(convs), "without a profile": 0, f"fewer than {args.min_turns} client turns": 0,
              "without a required trait": 0, f"longer than {args.max_tokens} tokens": 0}
    kept, turns, tokens = [], [], []
    for conv in tqdm(convs, desc="records", unit="conv"):
        profile = profiles.get(conv.id)
        if profile is None:
            counts["without a profile"] += 1
            continue
        if len(conv.client_turns()) < args.min_turns:
            counts[f"fewer than {args.min_turns} client turns"] += 1
            continue
        if args.require_trait and has_traits(profile["profile"], args.require_trait) is not None:
            counts["without a required trait"] += 1
            continue
        record = record_of(conv, profile)
        n = count_tokens(record["messages"])
        if n > args.max_tokens:
            counts[f"longer than {args.max_tokens} tokens"] += 1
            continue
        kept.append(record)
        turns.append(len(conv.client_turns()))
        tokens.append(n)
    counts["written"] = len(kept)
    return kept, counts, turns, tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eeyore.data.build_sft",
        description="Build SFT records (profile as system prompt, client as assistant) from conversations and "
        "their extracted profiles, with filters and a data card.",
    )
    p.add_argument("conversations", help="conversations: a .json/.jsonl/.parquet file or folder of records with a messages list")
    p.add_argument("profiles", help="profiles by conversation: extract_profiles output, or profile records")
    p.add_argument("--output", required=True, type=Path, help="folder for train.jsonl, README.md and the charts")
    p.add_argument("--messages-key", default="messages", help="field holding the messages (records with 'conversation' are read too) (default: %(default)s)")
    p.add_argument("--client-role", default="assistant", help="the role the client speaks in; every other non-system role is the counsellor (default: %(default)s)")
    p.add_argument("--min-turns", type=int, default=1, help="keep conversations with at least this many client turns (default: %(default)s)")
    p.add_argument("--require-trait", action="append", default=[], metavar="TRAIT",
                   help="keep profiles with this trait: mild, moderate, severe, distortion, overall, or a symptom / "
                   "distortion name (repeatable: all are required; default: none)")
    p.add_argument("--max-tokens", type=int, default=4096, help="drop records longer than this, as the tokenizer counts them in training (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="checkpoint folder (or cached hub id) whose tokenizer counts tokens (default: the embedded default model)")
    p.add_argument("--chat-template", default=None, help="chat template, as --tokenizer_chat_template of eeyore.train.sft (default: the tokenizer's own)")
    args = p.parse_args(argv)
    if args.min_turns < 1 or args.max_tokens < 1:
        p.error("--min-turns and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from eeyore.model.chat import TemplateError

    try:
        convs = load_conversations(args.conversations, args.messages_key, args.client_role)
        profiles = load_profile_records(args.profiles)
        records, counts, turns, tokens = build(convs, profiles, args, TokenCounter(args.tokenizer, args.chat_template))
    except (DataError, FileNotFoundError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.output / "train.jsonl", records)
    images = charts(args.output, turns, tokens, distributions(records))
    settings = {k: getattr(args, k) for k in ("conversations", "profiles", "min_turns", "require_trait", "max_tokens",
                                              "tokenizer", "chat_template", "client_role")}
    write_atomic(args.output / "README.md", card(counts, turns, tokens, records, settings, images))
    print(f"{counts['written']} of {counts['conversations']} conversations written to {args.output / 'train.jsonl'}; "
          f"data card {args.output / 'README.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
