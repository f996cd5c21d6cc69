"""`python -m eeyore.serve`: an OpenAI-compatible server for a Llama checkpoint.

With no arguments it serves the embedded default model on 127.0.0.1. The reference command
line works unchanged:

    python -m eeyore.serve --model DIR --host 127.0.0.1 --port 6416 --temperature 1.0 --top-p 0.8 \\
        --max-new-tokens 4096 --sequence-bias "[[[128009], -4.0]]" --exponential-decay-length-penalty 0 1.01

The sampling flags are the server's defaults; each request's own fields override them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from eeyore.model.lookup import DEFAULT_MODEL_NAME

from .app import LOADING, create_app
from .engine import Engine
from .params import parse_sequence_bias


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eeyore.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint directory or HF hub id in the local cache "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' "
                   "(default: the checkpoint directory's name)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16; auto = float32 on CPU, "
                   "the checkpoint's dtype on CUDA")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto = cuda when available")
    g.add_argument("--chat-template", default=None, help="override the tokenizer's chat template: 'llama3' "
                   "(the reference's training template), a .jinja file, or template source")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=6416, help="port to listen on (default 6416)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together; each holds "
                   "a KV-cache slot of --max-model-len positions (default 16)")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before new ones "
                   "get 429 (default 256)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length: prompt + completion "
                   "tokens (default: min(4096, the model's max_position_embeddings))")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled between two decode "
                   "steps; bounds how long a long prompt stalls running streams (default 512)")
    g = p.add_argument_group("sampling defaults (each request may override them)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: checkpoint, else 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass (default: checkpoint, else 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off (default: checkpoint, else 50 as in transformers)")
    g.add_argument("--min-p", type=float, default=None, help="min-p filter (default: checkpoint, else off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition penalty")
    g.add_argument("--max-new-tokens", type=int, default=None, help="completion length when a request gives "
                   "none (default: checkpoint, else up to the context length)")
    g.add_argument("--sequence-bias", default=None, help='JSON list of [token_ids, bias], e.g. "[[[128009], -4.0]]"')
    g.add_argument("--exponential-decay-length-penalty", nargs=2, type=float, metavar=("START", "FACTOR"), default=None,
                   help="after START generated tokens, raise eos logits by |x| * (FACTOR^(k-START) - 1)")
    g.add_argument("--seed", type=int, default=None, help="seed of the shared generator for requests without one")
    return p.parse_args(argv)


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    decay = args.exponential_decay_length_penalty
    return {
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "max_tokens": args.max_new_tokens,
        "sequence_bias": parse_sequence_bias(args.sequence_bias, "--sequence-bias") if args.sequence_bias else None,
        "exponential_decay_length_penalty": (int(decay[0]), float(decay[1])) if decay else None,
    }


def engine_loader(args: argparse.Namespace) -> Any:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else None)
    overrides = sampling_overrides(args)  # parsed now, so a bad flag fails before the server starts

    def load() -> Engine:
        engine = Engine.from_pretrained(
            args.model, dtype, device, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
            max_model_len=args.max_model_len, overrides=overrides, prefill_chunk=args.prefill_chunk,
            chat_template=args.chat_template, seed=args.seed,
        )
        c, param = engine.model.config, next(engine.model.parameters())
        cache_bytes = (2 * c.num_hidden_layers * engine.max_batch_size * c.num_key_value_heads
                       * engine.max_model_len * c.head_dim * param.element_size())
        logging.getLogger("eeyore.serve").info(
            "loaded %s on %s: context %d, %d slots, KV cache %.2f GiB; defaults %s",
            args.model or DEFAULT_MODEL_NAME, device, engine.max_model_len, engine.max_batch_size,
            cache_bytes / 2**30, engine.defaults)
        return engine

    return load


async def serve(args: argparse.Namespace) -> None:
    name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    app = create_app(engine_loader(args), name, args.api_key)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"listening on http://{args.host}:{args.port}/v1 as '{name}', loading the model...", flush=True)
        await app[LOADING]
        print("ready", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
