"""`python -m eeyore.serve`: an OpenAI-compatible server for a Llama checkpoint.

With no arguments it serves the embedded default model on 127.0.0.1. The reference command
line works unchanged:

    python -m eeyore.serve --model DIR --host 127.0.0.1 --port 6416 --temperature 1.0 --top-p 0.8 \\
        --max-new-tokens 4096 --sequence-bias "[[[128009], -4.0]]" --exponential-decay-length-penalty 0 1.01

The sampling flags are the server's defaults; each request's own fields override them. A budget
(--max-new-tokens, or a request's max_tokens) larger than the room a prompt leaves in the context
is cut to that room, and such a reply ends with finish_reason "length".
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

from eeyore.model.fastpath import add_arguments as add_fast_path_arguments
from eeyore.model.linear import check_forced

from .app import MAX_BODY_BYTES, create_app
from .engine import Engine
from .lifecycle import listen, run_until_signal
from .memory import CPU_MEMORY_FRACTION, GPU_MEMORY_UTILIZATION, MIN_CONTEXT, kv_bytes_per_token
from .params import ParamError, check_params, layered_defaults, parse_sequence_bias
from .protocol import MAX_MESSAGES

log = logging.getLogger("eeyore.serve")
FLAG_OF_FIELD = {"max_tokens": "--max-new-tokens"}  # the others are the field's name as a flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eeyore.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint directory or HF hub id in the local cache "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="the name reported in responses and /v1/models; "
                   "requests may name any model (default: the checkpoint directory's name)")
    g.add_argument("--strict-model-name", action="store_true", help="answer 404 to a request whose 'model' is "
                   "not the served name (default: off, any name is served, as the reference server did)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16; auto = float32 on CPU, "
                   "the checkpoint's dtype on CUDA")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto = cuda when available")
    g.add_argument("--chat-template", default=None, help="override the tokenizer's chat template: 'llama3' "
                   "(the reference's training template), a .jinja file, or template source")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("speed")
    add_fast_path_arguments(g)
    g.add_argument("--compile", action="store_true", help="run the decode step through torch.compile (CUDA "
                   "graphs on CUDA: several times faster decode there), compiled before the server takes requests: "
                   "minutes the first time (on CPU, and on a GPU for each batch bucket), less once torch has kept "
                   "the result on disk; in bf16 on CPU the compiled step keeps its own copy of the weights (default off)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=6416, help="port to listen on (default 6416)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: none)")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413 "
                   f"(default {MAX_BODY_BYTES})")
    g.add_argument("--max-messages", type=int, default=MAX_MESSAGES, help="chat requests with more messages get "
                   f"400 (default {MAX_MESSAGES})")
    g.add_argument("--header-timeout", type=float, default=30.0, help="seconds a new connection may take to send "
                   "its request headers before it is closed (default 30)")
    g.add_argument("--shutdown-timeout", type=float, default=25.0, help="on SIGTERM/SIGINT, seconds running "
                   "requests may take to finish before they are ended with an error (default 25)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together; each holds "
                   "a KV-cache slot of --max-model-len positions; fewer when the memory budget cannot hold them "
                   "(default 16)")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before new ones "
                   "get 429 (default 256)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length: prompt + completion "
                   "tokens (default: the model's max_position_embeddings, bounded by the KV-cache memory budget, "
                   f"but kept at {MIN_CONTEXT} or more by using fewer slots)")
    g.add_argument("--gpu-memory-utilization", type=float, default=GPU_MEMORY_UTILIZATION, help="on CUDA, the "
                   "fraction of the GPU memory free after loading the weights that the KV cache may take "
                   f"(default {GPU_MEMORY_UTILIZATION})")
    g.add_argument("--cpu-memory-fraction", type=float, default=CPU_MEMORY_FRACTION, help="on CPU, the fraction "
                   f"of the available RAM that the KV cache may take (default {CPU_MEMORY_FRACTION})")
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
    args = p.parse_args(argv)
    try:  # before anything loads
        check_forced(args.cpu_matmul, inference=True, may_pack=not args.compile)
    except ValueError as exc:
        p.error(str(exc))
    return args


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as defaults; ValueError names a bad flag before anything loads."""
    decay = args.exponential_decay_length_penalty
    overrides = {
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "max_tokens": args.max_new_tokens,
        "sequence_bias": parse_sequence_bias(args.sequence_bias, "--sequence-bias") if args.sequence_bias else None,
        "exponential_decay_length_penalty": (int(decay[0]), float(decay[1])) if decay else None,
    }
    try:
        check_params(layered_defaults(overrides), lambda name: FLAG_OF_FIELD.get(name, "--" + name.replace("_", "-")))
    except ParamError as exc:
        raise ValueError(str(exc)) from None
    return overrides


def check_against_model(engine: Engine, overrides: dict[str, Any]) -> None:
    """Flags that only the loaded model can judge: the sequence bias's token ids."""
    vocab = engine.model.config.vocab_size
    for ids, _ in engine.defaults.sequence_bias:
        if engine.out_of_vocab(ids) is not None:
            where = "--sequence-bias" if overrides.get("sequence_bias") else "generation_config.json sequence_bias"
            eos = engine.eos_ids
            raise ValueError(f"{where}: token ids {list(ids)} are outside this model's vocabulary (0..{vocab - 1}); "
                             f"its end-of-turn ids are {eos}, e.g. --sequence-bias \"[[[{eos[0] if eos else 0}], -4.0]]\"")


def engine_loader(args: argparse.Namespace) -> Any:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else None)
    overrides = sampling_overrides(args)  # parsed now, so a bad flag fails before the server starts
    fraction = args.gpu_memory_utilization if device.startswith("cuda") else args.cpu_memory_fraction

    def load() -> Engine:
        engine = Engine.from_pretrained(
            args.model, dtype, device, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
            max_model_len=args.max_model_len, memory_fraction=fraction, overrides=overrides,
            prefill_chunk=args.prefill_chunk, chat_template=args.chat_template, seed=args.seed,
            fast_path=dict(kernels=args.kernels, cpu_matmul=args.cpu_matmul, compile=args.compile),
        )
        check_against_model(engine, overrides)
        cache_bytes = (kv_bytes_per_token(engine.model.config, engine.dtype) * engine.max_batch_size
                       * engine.max_model_len)
        log.info("loaded %s on %s in %s: context %d (the model's own: %d), %d slots, KV cache %.2f GiB; defaults %s",
                 args.model or DEFAULT_MODEL_NAME, device, str(engine.dtype).removeprefix("torch."), engine.max_model_len,
                 engine.model.config.max_position_embeddings, engine.max_batch_size, cache_bytes / 2**30, engine.defaults)
        return engine

    return load


async def serve(args: argparse.Namespace) -> None:
    name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    app = create_app(engine_loader(args), name, args.api_key, args.max_body_bytes, args.max_messages,
                     args.strict_model_name)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    listener = None
    try:
        listener = await listen(runner, args.host, args.port, args.header_timeout)
        port = listener.sockets[0].getsockname()[1]  # the one the system gave, with --port 0
        log.info("listening on http://%s:%d/v1 as '%s'; loading the model (/health answers 503 meanwhile)",
                 args.host, port, name)
        await run_until_signal(app, runner, listener, args.shutdown_timeout,
                               on_ready=lambda: log.info("ready: serving '%s' on http://%s:%d/v1", name, args.host, port))
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
