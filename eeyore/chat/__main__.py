"""`python -m eeyore.chat`: be the counsellor, and talk to a simulated client in the terminal.

The model plays the client described by a profile, from the system prompt rendered exactly as
the training data renders it, and its replies stream as they are generated. By default the
embedded model runs in this process; `--model DIR` runs another checkpoint, `--base-url` talks
to any OpenAI-compatible server (e.g. `python -m eeyore.serve`). Sampling follows the reference:
temperature 1.0, top-p 0.8, a -4.0 bias on the end-of-turn token and an exponential decay
length penalty (0, 1.01).

Type a message and press Enter. `/quit`, Ctrl-D or Ctrl-C ends the session; the transcript is
saved as JSON after every reply and on exit.

  python -m eeyore.chat --profile 2
  python -m eeyore.chat --profile my_profile.json --model out/sft
  python -m eeyore.chat --profile 0 --base-url http://127.0.0.1:6416/v1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from eeyore.chat.backends import ChatError, ChatSampling, EngineBackend, HTTPBackend
from eeyore.chat.transcript import Transcript
from eeyore.profile import Profile, ProfileError, load_profiles, render_system_prompt, validate_profile

HELP = "/quit (or Ctrl-D, Ctrl-C) ends and saves; /prompt shows the client's system prompt; /help this line"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eeyore.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the client")
    g.add_argument("--profile", default="0", metavar="N|FILE",
                   help="N: the Nth sample profile shipped with eeyore (0-based); FILE: a profile JSON, one "
                        "record or a list of them (default 0)")
    g.add_argument("--index", type=int, default=0, help="which record of FILE when it holds a list (default 0)")
    g = p.add_argument_group("the model (in this process unless --base-url is given)")
    g.add_argument("--model", default=None, help="checkpoint directory or cached hub id (default: the embedded "
                                                 "SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda when available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default auto: float32 on CPU, "
                                                   "the checkpoint's on CUDA)")
    g.add_argument("--chat-template", default=None, help="override the checkpoint's chat template: 'llama3', a "
                                                         ".jinja file or template source (default: the checkpoint's)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens (default: the "
                                                                   "engine's default for the model)")
    g.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:6416/v1 "
                                                    "(default: none, run the model here)")
    g.add_argument("--api-key", default=None, help="API key for --base-url (default: none)")
    g.add_argument("--model-name", default=None, help="model name sent to --base-url (default: the first model "
                                                      "its /models lists)")
    g.add_argument("--plain-openai", action="store_true", help="send --base-url only OpenAI's own fields, not "
                   "sequence_bias / exponential_decay_length_penalty, for servers that refuse unknown fields (default: off)")
    g = p.add_argument_group("sampling (the reference's defaults)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=0.8, help="nucleus mass (default 0.8)")
    g.add_argument("--eot-bias", type=float, default=-4.0, help="added to the end-of-turn logit, the reference's "
                   "sequence bias [[[eot], -4.0]]; 0 = off (default -4.0)")
    g.add_argument("--eot-ids", default=None, help="comma-separated end-of-turn token ids to bias (default: the "
                   "model's own end-of-turn id in process; with --base-url none is sent, the server's default applies)")
    g.add_argument("--exponential-decay-length-penalty", nargs=2, type=float, metavar=("START", "FACTOR"),
                   default=(0, 1.01), help="after START reply tokens, raise the end-of-turn logit by "
                   "|logit| * (FACTOR^(k-START) - 1) (default 0 1.01)")
    g.add_argument("--max-tokens", type=int, default=None, help="longest reply in tokens (default: up to the "
                                                                "context left, or the server's default)")
    g.add_argument("--seed", type=int, default=None, help="turn k samples with seed + k (default: unseeded)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="transcript JSON (default runs/chat/TIME-profile-P.json)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.model and a.base_url:
        p.error("--model runs a checkpoint here and --base-url talks to a server: give one of them")
    try:
        a.eot_ids = tuple(int(t) for t in a.eot_ids.split(",")) if a.eot_ids else None
    except ValueError:
        p.error(f"--eot-ids: expected comma-separated token ids, got {a.eot_ids!r}")
    return a


def choose_profile(spec: str, index: int) -> tuple[Profile, str]:
    """`--profile N` -> the Nth sample profile; a path -> its record. Returns (profile, where)."""
    if spec.isascii() and spec.isdigit():
        samples = load_profiles(None)
        n = int(spec)
        if n >= len(samples):
            raise ProfileError(f"--profile {n}: there are {len(samples)} sample profiles (0-{len(samples) - 1})")
        return samples[n], f"sample profile {n}"
    path = Path(spec)
    if not path.is_file():
        raise ProfileError(f"--profile {spec}: no such file (give a profile JSON or a sample number)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"--profile {path}: not valid JSON: {exc}") from None
    if isinstance(data, dict):
        return validate_profile(data, 0, str(path)), str(path)
    if not isinstance(data, list) or not data:
        raise ProfileError(f"--profile {path}: expected a profile record or a non-empty list of them")
    if not 0 <= index < len(data):
        raise ProfileError(f"--index {index}: {path} holds {len(data)} profiles (0-{len(data) - 1})")
    return validate_profile(data[index], index, str(path)), f"{path} [{index}]"


def introduce(profile: Profile) -> str:
    """"Maya, female, 30~34, nurse": the fields the profile knows, for the session's first line."""
    known = [str(profile.fields.get(k, "")) for k in ("name", "gender", "age", "occupation")]
    known = [v for v in known if v and "cannot be identified" not in v.lower()]
    return ", ".join(known) if known else "the client"


def default_out(spec: str, index: int) -> Path:
    name = spec if spec.isdigit() else f"{Path(spec).stem}-{index}"
    return Path("runs/chat") / f"{time.strftime('%Y%m%d-%H%M%S')}-profile-{name}.json"


def reply(loop: asyncio.AbstractEventLoop, backend: Any, t: Transcript, s: ChatSampling, turn: int) -> str:
    """Stream one client reply to the terminal; on Ctrl-C, what was generated so far is kept."""
    parts: list[str] = []

    async def run() -> None:
        async for piece in backend.stream(t.chat_messages(), s, turn):
            parts.append(piece)
            print(piece, end="", flush=True)

    task = loop.create_task(run())
    print("client> ", end="", flush=True)
    try:
        loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        t.add("assistant", "".join(parts))
        raise
    finally:
        print()
    if backend.finish_reason == "length":
        print("[the reply was cut at the token limit]", file=sys.stderr)
    return "".join(parts)


def converse(loop: asyncio.AbstractEventLoop, backend: Any, t: Transcript, s: ChatSampling) -> str:
    """The conversation loop; returns how it ended."""
    turn = 0
    while True:
        try:
            line = input("counsellor> ").strip()
        except EOFError:
            print()
            return "end of input (Ctrl-D)"
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return "/quit"
        if line == "/help":
            print(HELP)
            continue
        if line == "/prompt":
            print(t.system_prompt)
            continue
        t.add("user", line)
        try:
            t.add("assistant", reply(loop, backend, t, s, turn))
        except KeyboardInterrupt:
            return "Ctrl-C during the client's reply (the partial reply is kept)"
        t.save()
        turn += 1


def open_backend(loop: asyncio.AbstractEventLoop, a: argparse.Namespace) -> Any:
    if a.base_url:
        backend = HTTPBackend(a.base_url, a.api_key, a.model_name, a.plain_openai)
        loop.run_until_complete(backend.open())
        return backend
    print("loading the model...", file=sys.stderr, flush=True)
    return EngineBackend(a.model, a.device, a.dtype, a.max_model_len, a.chat_template)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        profile, where = choose_profile(a.profile, a.index)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    decay = a.exponential_decay_length_penalty
    s = ChatSampling(a.temperature, a.top_p, a.eot_bias, (int(decay[0]), float(decay[1])), a.max_tokens, a.seed,
                     a.eot_ids)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    loop = asyncio.new_event_loop()
    backend = None
    try:
        backend = open_backend(loop, a)
        eot = s.eot_ids or (backend.end_of_turn_ids() if isinstance(backend, EngineBackend) else None)
        source = {"base_url": a.base_url, "model_name": backend.model_name} if a.base_url else {"model": a.model or "embedded default"}
        t = Transcript(Path(a.out) if a.out else default_out(a.profile, a.index), render_system_prompt(profile, "train"),
                       {"profile": {"from": where, "label": profile.label, "record": profile.record},
                        **source, "sampling": s.describe(eot)})
        print(f"You are the counsellor; the model plays {introduce(profile)} ({where}).\n{HELP}")
        try:
            t.ended_by = converse(loop, backend, t, s)
        except KeyboardInterrupt:
            print()
            t.ended_by = "Ctrl-C"
        print(f"transcript saved to {t.save()}")
        return 0
    except ChatError as exc:
        if "t" in locals():
            t.ended_by = f"error: {exc}"
            print(f"\nerror: {exc}\ntranscript saved to {t.save()}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:  # a checkpoint that will not load, a bad template
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            loop.run_until_complete(backend.close())
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
