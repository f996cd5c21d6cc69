"""Round-1 preference data from SFT conversations: `python -m eeyore.data.make_preferences`.

For each sampled assistant (client) turn of a conversation:
  prompt   = the conversation up to that turn, with the real profile as system prompt;
  chosen   = the real client reply;
  rejected = a reply generated for the same dialogue under a *perturbed* profile
             (eeyore.data.perturb: severities moved, distortions swapped, demographics changed),
             by any OpenAI-compatible endpoint (`--endpoint`) or by our own engine (`--local_model`).
Each row records its perturbation, the perturbed system prompt and where it came from, and is in
the shape `python -m eeyore.train.dpo --prompt_key prompt --apply_chat_template` reads.

The paper describes this step but never released it; this is our reconstruction.

Resumable: rows are appended to the output as they finish (a `.parquet` output is assembled at
the end from a `.partial.jsonl` beside it); a rerun skips the (row, turn) pairs already written.
Turn sampling and perturbations are seeded per conversation, so a resumed run makes the same plan.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from eeyore.profile import parse_system_prompt, render_system_prompt
from eeyore.train.data import DataError, Row, load_rows

from .conversations import append_record, messages_key_of, read_records
from .perturb import PerturbConfig, perturb_profile

Generate = Callable[[list[dict[str, str]]], Awaitable[str]]


@dataclass
class Task:
    """One preference row to make: which turn, and everything needed to generate and write it."""

    row: int
    turn: int
    prompt: list[dict[str, str]]  # real system prompt + dialogue before the turn
    chosen: str
    perturbed_prompt: list[dict[str, str]]  # same dialogue under the perturbed system prompt
    perturbation: list[dict[str, Any]]

    def to_record(self, rejected: str, generator: str) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "perturbation": self.perturbation,
            "perturbed_system_prompt": self.perturbed_prompt[0]["content"],
            "source_row": self.row,
            "turn": self.turn,
            "generator": generator,
        }


def dialogue_of(row: Row, messages_key: str) -> list[dict[str, str]]:
    """The messages, system prompt first (SFT records keep them under `messages_key`, profile
    records under `conversation`)."""
    key = messages_key_of(row, messages_key)
    messages = row.messages(key)
    if messages[0]["role"] != "system":
        raise DataError(f"{row.where}: field {key!r}: the first message must be the system prompt with the profile")
    return messages


def profile_of(row: Row, system_prompt: str) -> dict[str, Any]:
    """The record's `profile` object when it has one, else the profile read back from its system prompt."""
    if isinstance(row.record.get("profile"), dict):
        return row.record["profile"]
    try:
        return parse_system_prompt(system_prompt)
    except ValueError as e:
        raise DataError(f"{row.where}: no 'profile' field and the system prompt cannot be read as one: {e}") from None


def plan(rows: list[Row], messages_key: str, turns: int, seed: int, perturb: PerturbConfig) -> tuple[list[Task], int]:
    """Every task to run (in input order) and the number of conversations without a client turn."""
    tasks, skipped = [], 0
    for index, row in enumerate(rows):
        messages = dialogue_of(row, messages_key)
        candidates = [j for j, m in enumerate(messages) if j > 0 and m["role"] == "assistant"]
        if not candidates:
            skipped += 1
            continue
        profile = profile_of(row, messages[0]["content"])
        rng = random.Random(f"{seed}:{index}")  # per conversation: independent of the rest of the file
        chosen_turns = sorted(rng.sample(candidates, len(candidates) if turns <= 0 else min(turns, len(candidates))))
        for turn in chosen_turns:
            perturbed, changes = perturb_profile(profile, rng, perturb)
            system = {"role": "system", "content": render_system_prompt(perturbed, style="train")}
            dialogue = messages[1:turn]
            tasks.append(Task(index, turn, messages[:turn], messages[turn]["content"], [system, *dialogue], changes))
    return tasks, skipped


def _work_file(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl") if output.suffix == ".parquet" else output


def done_keys(output: Path) -> set[tuple[int, int]]:
    """(source_row, turn) of the rows already written by an earlier run. A last line cut short by
    an interrupted run is removed, so the file stays valid JSON lines."""
    work = _work_file(output)
    if output.suffix == ".parquet" and output.is_file() and not work.is_file():
        return {(r["source_row"], r["turn"]) for r in pq.read_table(output, columns=["source_row", "turn"]).to_pylist()}
    keys = set()
    for lineno, record in enumerate(read_records(work), start=1):
        try:
            keys.add((record["source_row"], record["turn"]))
        except KeyError:
            raise DataError(f"{work} line {lineno}: not a preference row written by this tool; "
                            "pass a new --output or remove the file") from None
    return keys


async def run_tasks(tasks: list[Task], generate: Generate, generator: str, output: Path, concurrency: int,
                    already: int = 0) -> int:
    """Generate the rejected replies `concurrency` at a time, appending each row as it finishes.
    Returns the number of tasks that produced an empty reply (not written: a rerun retries them)."""
    work = _work_file(output)
    work.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".parquet" and output.is_file() and not work.is_file():
        if not tasks:
            return 0
        pq_rows = pq.read_table(output).to_pylist()  # resume a finished parquet: extend it
        work.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pq_rows), encoding="utf-8")
    gate = asyncio.Semaphore(concurrency)
    empty = 0
    bar = tqdm(total=already + len(tasks), initial=already, desc="preference rows", unit="row")

    async def one(task: Task, sink) -> None:
        nonlocal empty
        async with gate:
            reply = (await generate(task.perturbed_prompt)).strip()
        if reply:
            append_record(sink, task.to_record(reply, generator))
        else:
            empty += 1
        bar.update(1)

    with work.open("a", encoding="utf-8") as sink:
        await asyncio.gather(*(one(t, sink) for t in tasks))
    bar.close()
    if output.suffix == ".parquet" and work.is_file():
        rows = [json.loads(line) for line in work.read_text(encoding="utf-8").splitlines() if line.strip()]
        pq.write_table(pa.Table.from_pylist(rows), output)
        work.unlink()
    return empty


def openai_generator(args: argparse.Namespace) -> tuple[Generate, Callable[[], Awaitable[None]]]:
    from eeyore.serve.client import ChatClient, Sampling

    client = ChatClient(args.endpoint, args.model, api_key=args.api_key, max_connections=args.concurrency)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    return (lambda messages: client.chat(messages, sampling)), client.close


def local_generator(args: argparse.Namespace) -> tuple[Generate, Callable[[], Awaitable[None]]]:
    from eeyore.serve.engine import Engine
    from eeyore.serve.request import ContextLengthError

    engine = Engine.from_pretrained(args.local_model, max_batch_size=args.concurrency, seed=args.seed).start()
    params = engine.defaults.updated(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)

    async def generate(messages: list[dict[str, str]]) -> str:
        # always a new client turn, even after a client message (the engine would continue it)
        prompt = engine.encode_chat(messages)
        try:
            return (await engine.agenerate([prompt], params))[0].text
        except ContextLengthError as e:  # the dialogue does not fit the context: counted, not fatal
            tqdm.write(f"skipped a prompt: {e}")
            return ""

    async def close() -> None:
        engine.close()

    return generate, close


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eeyore.data.make_preferences",
        description="Build round-1 DPO preference pairs: the real client reply (chosen) against a reply "
        "generated under a perturbed profile (rejected).",
    )
    p.add_argument("--dataset", required=True, help="SFT conversations: a .jsonl/.json/.parquet file, a folder, or a cached hub dataset id")
    p.add_argument("--split", default="train", help="split of --dataset to read (default: train)")
    p.add_argument("--messages_key", default="messages", help="field holding the conversation (records with a 'conversation' field are read too)")
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N conversations")
    p.add_argument("--output", required=True, type=Path, help="where to write the pairs: .jsonl or .parquet")
    p.add_argument("--turns_per_conversation", type=int, default=1, help="client turns sampled per conversation; <= 0 takes every turn (default: 1)")
    p.add_argument("--seed", type=int, default=42, help="seed of turn sampling, perturbations and local sampling")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
    src.add_argument("--local_model", help="generate with our own engine from this checkpoint dir or cached hub id")
    p.add_argument("--model", default="default", help="model name sent to --endpoint")
    p.add_argument("--api_key", default=None, help="bearer token for --endpoint (default: none)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (or engine batch slots)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (reference server: 1.0)")
    p.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (reference server: 0.8)")
    p.add_argument("--max_tokens", type=int, default=512, help="longest rejected reply, in tokens")
    p.add_argument("--symptoms", type=int, default=3, help="symptom severities moved per perturbation")
    p.add_argument("--distortion_swaps", type=int, default=1, help="exhibited/unexhibited distortion swaps per perturbation")
    p.add_argument("--demographics", type=int, default=1, help="demographic fields replaced per perturbation")
    p.add_argument("--keep_depression_severity", action="store_true", help="do not move the overall depression severity")
    p.add_argument("--move_resistance", action="store_true", help="also move the resistance toward the support")
    args = p.parse_args(argv)
    if args.output.suffix not in (".jsonl", ".parquet"):
        p.error(f"--output must end in .jsonl or .parquet, got {args.output}")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    return args


async def make_preferences(args: argparse.Namespace) -> int:
    """Plan, skip what the output already has, generate the rest; returns the rows not written."""
    perturb = PerturbConfig(args.symptoms, args.distortion_swaps, args.demographics,
                            move_depression=not args.keep_depression_severity, move_resistance=args.move_resistance)
    rows = load_rows(args.dataset, args.split, args.max_samples)
    tasks, skipped = plan(rows, args.messages_key, args.turns_per_conversation, args.seed, perturb)
    done = done_keys(args.output)
    todo = [t for t in tasks if (t.row, t.turn) not in done]
    print(f"{len(rows)} conversations ({skipped} without a client turn skipped), {len(tasks)} pairs planned, "
          f"{len(tasks) - len(todo)} already in {args.output}", file=sys.stderr)
    generate, close = (openai_generator if args.endpoint else local_generator)(args)
    generator = args.model if args.endpoint else str(args.local_model)
    try:
        empty = await run_tasks(todo, generate, generator, args.output, args.concurrency, len(tasks) - len(todo))
    finally:
        await close()
    if empty:
        print(f"{empty} replies came back empty (or their prompt did not fit) and were not written; "
              "rerun to retry them", file=sys.stderr)
    return empty


def main(argv: list[str] | None = None) -> None:
    asyncio.run(make_preferences(parse_args(argv)))


if __name__ == "__main__":
    main()
