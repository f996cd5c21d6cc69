"""Prefill and greedy-decode tokens/s of eeyore's Llama against transformers, same model and dtype.

    python bench/model_bench.py                 # the embedded SmolLM2-135M-Instruct, fp32
    python bench/model_bench.py --model DIR --dtype bfloat16 --threads 2

Both sides run in this process with the same thread count, alternating, best of --repeats.
Decode: ours is the KV-cache step loop (prefill, then one token per step for every row); theirs is
`generate(do_sample=False)` with its default dynamic cache. Ratios > 1 mean eeyore is faster.
Our fp32 CPU weights are packed for oneDNN as the engine packs them (`--plain-weights`: not).
"""
from __future__ import annotations

import argparse
import time

import torch

from eeyore.model import KVCache, Llama
from eeyore.model.pretrained import resolve_dtype, resolve_model_dir


@torch.inference_mode()
def ours_greedy(model: Llama, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    batch, length = prompt.shape
    cache = KVCache(model.config, batch, length + new_tokens, dtype=next(model.parameters()).dtype)
    positions = torch.arange(length).expand(batch, -1)
    token = model(prompt, positions, cache)[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for step in range(new_tokens - 1):
        positions = torch.full((batch, 1), length + step)
        token = model(token, positions, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


@torch.inference_mode()
def theirs_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill test")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length of the decode test")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per row")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--plain-weights", action="store_true",
                        help="do not pack our fp32 CPU weights for oneDNN (the engine packs them)")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    dtype = resolve_dtype(args.dtype)
    ours = Llama.from_pretrained(model_dir, dtype=dtype)
    if not args.plain_weights:
        ours.pack_for_cpu_inference()  # what the engine does with the model it serves
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    vocab = ours.config.vocab_size
    print(f"model {model_dir.name}  dtype {dtype}  threads {args.threads}")
    print(f"{'test':<24}{'eeyore tok/s':>14}{'transformers':>14}{'ratio':>8}")

    prompt = torch.randint(0, vocab, (1, args.prefill_len))
    with torch.inference_mode():
        ours(prompt), theirs(prompt)  # warm-up
        t_ours = best_time(lambda: ours(prompt), args.repeats)
        t_theirs = best_time(lambda: theirs(prompt, use_cache=False), args.repeats)
    n = args.prefill_len
    print(f"{'prefill ' + str(n):<24}{n / t_ours:>14.1f}{n / t_theirs:>14.1f}{t_theirs / t_ours:>8.2f}")

    for batch in args.batches:
        prompt = torch.randint(0, vocab, (batch, args.prompt_len))
        ours_greedy(ours, prompt, 4), theirs_greedy(theirs, prompt, 4)  # warm-up
        mine = ours_greedy(ours, prompt, args.new_tokens)
        ref = theirs_greedy(theirs, prompt, args.new_tokens)
        agree = (mine == ref).float().mean().item()
        t_ours = best_time(lambda: ours_greedy(ours, prompt, args.new_tokens), args.repeats)
        t_theirs = best_time(lambda: theirs_greedy(theirs, prompt, args.new_tokens), args.repeats)
        n = batch * args.new_tokens
        label = f"decode batch {batch}"
        print(f"{label:<24}{n / t_ours:>14.1f}{n / t_theirs:>14.1f}{t_theirs / t_ours:>8.2f}   (same tokens: {agree:.0%})")


if __name__ == "__main__":
    main()
