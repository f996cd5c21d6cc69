"""`python -m eeyore.studio`: the web pages for trainees and experts.

    python -m eeyore.studio                                 # the embedded model, sample profiles
    python -m eeyore.studio --model DIR --pairs prefs.jsonl --annotators alice,bob
    python -m eeyore.studio --base-url http://127.0.0.1:6416/v1   # any OpenAI-compatible server

Pages: /practice (chat with a simulated client), /annotate (choose between two client replies;
/annotate/summary shows progress and agreement), /profiles (validate and edit profiles).
Everything the studio writes goes under --data-dir.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from eeyore.train.data import DataError

from .backends import EngineBackend, OpenAIBackend
from .schema import ProfileError
from .state import Studio, annotator_tokens
from .app import create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eeyore.studio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("client replies (one of)")
    g.add_argument("--model", default=None, help="checkpoint directory or cached hub id run in this process "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--base-url", default=None, help="an OpenAI-compatible server's base URL, e.g. "
                   "http://127.0.0.1:6416/v1, instead of a model in this process (default: none)")
    g.add_argument("--served-model-name", default=None, help="with --base-url: the 'model' to request "
                   "(default: none, the server's only model)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="with --base-url: the environment "
                   "variable holding its API key, if it needs one (default OPENAI_API_KEY)")
    g.add_argument("--max-batch-size", type=int, default=16, help="without --base-url: replies generated "
                   "together (default 16)")
    g = p.add_argument_group("data")
    g.add_argument("--profiles", default=None, help="profiles JSON file for Practice and Profiles "
                   "(default: the sample profiles shipped with eeyore)")
    g.add_argument("--pairs", default=None, help="the annotation queue: preference pairs "
                   "(.jsonl/.json/.parquet with prompt, chosen, rejected) or prompt + candidates rows (default: none)")
    g.add_argument("--annotators", default=None, help="comma-separated annotator names; each gets a sign-in "
                   "token stored in DATA_DIR/annotators.json (default: none, one annotator 'local', no sign-in)")
    g.add_argument("--data-dir", default="./studio-data", help="where transcripts, labels and profile "
                   "versions are written (default ./studio-data)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=6417, help="port to listen on (default 6417)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[web.Application, Path | None]:
    """The app for parsed flags, and the annotator token file when there is one."""
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.base_url:
        backend = OpenAIBackend(args.base_url, args.served_model_name, os.environ.get(args.api_key_env))
    else:
        backend = EngineBackend(args.model, args.max_batch_size)
    names = [n.strip() for n in args.annotators.split(",") if n.strip()] if args.annotators else []
    tokens, token_file = annotator_tokens(names, data_dir) if names else (None, None)
    studio = Studio(backend, data_dir, args.profiles, args.pairs, names)
    return create_app(studio, tokens), token_file


async def serve(args: argparse.Namespace) -> None:
    app, token_file = build(args)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"studio on http://{args.host}:{args.port}/practice  (also /annotate, /profiles); "
              f"writing to {Path(args.data_dir).resolve()}", flush=True)
        if token_file:
            print(f"annotator sign-in tokens: {token_file.resolve()}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, DataError, ProfileError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
