"""Prefill and greedy-decode tokens/s of eeyore's Llama against transformers, same model and dtype.

    python bench/model_bench.py                 # the embedded SmolLM2-135M-Instruct, fp32
    python bench/model_bench.py --compile       # adds the torch.compile'd decode step (--compile)
    python bench/model_bench.py --model DIR --dtype bfloat16 --threads 2 --cpu-matmul blas

Both sides run in this process with the same thread count, alternating, best of --repeats.
Ours is prepared as the engine prepares its model (`decode.for_inference`: the CPU products
measured fastest here, `--cpu-matmul` to force one). Decode: ours is the KV-cache step loop
(prefill, then one `DecodeStep` per token for every row); theirs is `generate(do_sample=False)`
with its default dynamic cache. Ratios > 1 mean eeyore is faster.

Prefill, two ways: a forward giving every position's logits (`model(ids)` on both sides), and
the prefill of generation, which fills the KV cache and gives only the last position's logits
(ours as the engine runs it; theirs as `generate` runs it: a dynamic cache, `logits_to_keep=1`).

Beside every decode figure: the weight-streaming bound, i.e. the tokens/s of a step that did
nothing but read every weight once (bytes of weights / the measured time of one pass over them,
times the batch), and the share of it reached. Greedy parity: the share of equal tokens, and for
each row that diverges from transformers, the gap between transformers' top two logits at the
first divergence (a gap within rounding means a tie that either side may break).
"""
from __future__ import annotations

import argparse
import time

import torch

from eeyore.model import KVCache, Llama, linear
from eeyore.model.decode import DecodeStep, for_inference
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.pretrained import resolve_dtype, resolve_model_dir
from machine import cpu_description, weight_bytes, weight_pass_seconds

TEXTS = [  # natural prompts: greedy continuations of random ids are full of near-ties
    "I have been feeling really tired lately, and I don't know why. Work has been",
    "The counsellor asked me how my week went, and honestly I told her that",
    "My sister called yesterday to ask whether I would come home for the holidays, but",
    "Since I moved to the city I haven't made many friends, and most evenings I",
    "Sleep has been hard for me. I lie awake thinking about everything I should have",
    "The doctor suggested I try going for a walk every morning, which sounds simple but",
    "When I was younger I loved painting, but these days I can barely find the energy to",
    "People keep telling me to cheer up, as if it were that easy. What they don't see is",
]


def prompts(tok: Tokenizer, batch: int, length: int, vocab: int) -> torch.Tensor:
    rows = [tok.encode(TEXTS[i % len(TEXTS)] * 4)[:length] for i in range(batch)]
    return torch.tensor(rows) if all(len(r) == length for r in rows) else torch.randint(0, vocab, (batch, length))


@torch.inference_mode()
def ours_greedy(model: Llama, step: DecodeStep, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    batch, length = prompt.shape
    cache = KVCache(model.config, batch, length + new_tokens, dtype=next(model.parameters()).dtype)
    model.hidden_states(prompt[:, :-1], torch.arange(length - 1).expand(batch, -1), cache)
    token, out = prompt[:, -1:], []
    for pos in range(length - 1, length - 1 + new_tokens):
        token = step(token, torch.full((batch, 1), pos), cache, pos + 1).argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def ours_prefill(model: Llama, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """A prompt into the KV cache and the next token's logits, as the engine prefills."""
    positions = torch.arange(prompt.shape[1]).expand(prompt.shape[0], -1)
    return model.lm_head(model.hidden_states(prompt, positions, cache)[:, -1])


@torch.inference_mode()
def theirs_greedy(model, prompt: torch.Tensor, new_tokens: int, scores: bool = False):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         output_scores=scores, return_dict_in_generate=scores)
    return (out.sequences[:, prompt.shape[1]:], torch.stack(out.scores, 1)) if scores else out[:, prompt.shape[1]:]


def parity(mine: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor) -> str:
    """Equal tokens, and transformers' top-two logit gap where each diverging row first differs."""
    gaps = []
    for row in range(mine.shape[0]):
        differ = (mine[row] != ref[row]).nonzero()
        if len(differ):
            top2 = scores[row, int(differ[0])].topk(2).values
            gaps.append(f"{float(top2[0] - top2[1]):.1e}")
    text = f"same tokens {(mine == ref).float().mean().item():.0%}"
    return text + (f"; first-divergence top-2 gaps {', '.join(gaps)}" if gaps else "")


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
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides; default float32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill test (default 512)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt length of the decode test (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per row (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--cpu-matmul", default="auto", help="auto, blas, onednn or packed (default auto: measured)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step "
                        "(its first steps compile: minutes on CPU)")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    dtype = resolve_dtype(args.dtype)
    tok = Tokenizer.from_pretrained(model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ours = Llama.from_pretrained(model_dir, dtype=dtype)
    nbytes, pass_s = weight_bytes(theirs), weight_pass_seconds(theirs)
    # with --compile the weights stay plain (the compiler takes no packed copies) for both steps
    compiled = for_inference(ours, cpu_matmul=args.cpu_matmul, compile=args.compile)
    steps = {"eager": DecodeStep(ours), **({"compiled": compiled} if args.compile else {})}
    vocab = ours.config.vocab_size
    print(cpu_description())
    print("CPU products chosen: " + ", ".join(f"{k} {v}" for k, v in linear.chosen().items()))
    print(f"model {model_dir.name}  dtype {dtype}  weights {nbytes / 2**20:.0f} MiB, one pass over them "
          f"{pass_s * 1e3:.1f} ms ({nbytes / pass_s / 1e9:.1f} GB/s)")
    print(f"{'test':<26}{'eeyore tok/s':>14}{'transformers':>14}{'ratio':>8}{'bound tok/s':>13}{'of bound':>10}")

    prompt, n = torch.randint(0, vocab, (1, args.prefill_len)), args.prefill_len
    cache = KVCache(ours.config, 1, n, dtype=next(ours.parameters()).dtype)
    prefills = {  # test: (ours, theirs)
        f"prefill {n}": (lambda: ours(prompt), lambda: theirs(prompt, use_cache=False)),
        f"prefill {n} for generation": (lambda: ours_prefill(ours, prompt, cache),
                                        lambda: theirs(prompt, use_cache=True, logits_to_keep=1)),
    }
    with torch.inference_mode():
        for test, (mine, ref) in prefills.items():
            mine(), ref()  # warm-up
            t_ours, t_theirs = best_time(mine, args.repeats), best_time(ref, args.repeats)
            print(f"{test:<26}{n / t_ours:>14.1f}{n / t_theirs:>14.1f}{t_theirs / t_ours:>8.2f}")

    for batch in args.batches:
        prompt = prompts(tok, batch, args.prompt_len, vocab)
        ref, scores = theirs_greedy(theirs, prompt, args.new_tokens, scores=True)
        t_theirs = best_time(lambda: theirs_greedy(theirs, prompt, args.new_tokens), args.repeats)
        for name, step in steps.items():
            mine = ours_greedy(ours, step, prompt, args.new_tokens)  # warm-up (compiles) and parity
            t_ours = best_time(lambda: ours_greedy(ours, step, prompt, args.new_tokens), args.repeats)
            n, bound = batch * args.new_tokens, batch / pass_s
            print(f"{f'decode batch {batch} {name}':<26}{n / t_ours:>14.1f}{n / t_theirs:>14.1f}{t_theirs / t_ours:>8.2f}"
                  f"{bound:>13.1f}{n / t_ours / bound:>10.0%}   ({parity(mine, ref, scores)})")


if __name__ == "__main__":
    main()
