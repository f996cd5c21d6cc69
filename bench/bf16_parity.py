"""How close bf16 decoding stays to fp32: transformers in bf16 against eeyore's eager and compiled bf16 steps.

    python bench/bf16_parity.py                  # the embedded SmolLM2-135M-Instruct, 8 prompts x 64 tokens
    python bench/bf16_parity.py --no-compile     # skip the compiled step (its compile takes minutes)

Greedy tokens in bf16 part from transformers' bf16 ones at near-ties (logits near 20 are 0.125
apart in bf16), and once two greedy paths part, every later token differs, so the share of
equal greedy tokens says little about a model's numbers. This measures them instead, teacher
forced: the fp32 model's greedy continuation of each prompt is fed to every bf16 variant, and at
each position its logits are compared with fp32's: how often its top token is fp32's, how far
apart fp32's top two were where it is not (a near-tie, or a fault?), and the mean and largest
difference of the logits. transformers runs one forward over the whole sequence; eeyore's steps
decode a token at a time over the KV cache, as the server does.
"""
from __future__ import annotations

import argparse

import torch

from eeyore.model import KVCache, Llama
from eeyore.model.decode import DecodeStep, for_inference
from eeyore.model.pretrained import resolve_model_dir
from eeyore.model.tokenizer import Tokenizer
from machine import cpu_description
from model_bench import TEXTS


@torch.inference_mode()
def decoded_logits(model: Llama, step: DecodeStep, prompt: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a token-at-a-time decode of `fed` after `prompt`'s prefill."""
    batch, length = prompt.shape
    cache = KVCache(model.config, batch, length + fed.shape[1], dtype=next(model.parameters()).dtype)
    model.hidden_states(prompt[:, :-1], torch.arange(length - 1).expand(batch, -1), cache)
    tokens, out = torch.cat([prompt[:, -1:], fed[:, :-1]], 1), []
    for i in range(fed.shape[1]):
        pos = length - 1 + i
        out.append(step(tokens[:, i:i + 1], torch.full((batch, 1), pos), cache, pos + 1).float())
    return torch.stack(out, 1)


def compare(name: str, logits: torch.Tensor, ref: torch.Tensor) -> None:
    top, ref_top = logits.argmax(-1), ref.argmax(-1)
    differ = top != ref_top
    top2 = ref.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1])[differ]
    diff = (logits - ref).abs()
    gap_text = f"{gaps.max().item():.3f}" if len(gaps) else "-"
    print(f"{name:<30}{1 - differ.float().mean().item():>10.1%}{int(differ.sum()):>8}{gap_text:>14}"
          f"{diff.mean().item():>12.4f}{diff.max().item():>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded SmolLM2)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens compared per row (default 64)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled bf16 step (default: included)")
    args = parser.parse_args()

    import transformers

    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(model_dir)
    prompt = torch.tensor([tok.encode(text * 4)[:args.prompt_len] for text in TEXTS])
    reference = Llama.from_pretrained(model_dir, dtype=torch.float32)
    fed = []
    with torch.inference_mode():  # fp32's greedy continuation, the tokens every variant is fed
        ref_step = for_inference(reference)
        sequence = prompt
        for _ in range(args.new_tokens):
            nxt = reference(sequence)[:, -1].argmax(-1, keepdim=True)
            fed.append(nxt)
            sequence = torch.cat([sequence, nxt], 1)
    fed = torch.cat(fed, 1)
    ref = decoded_logits(reference, ref_step, prompt, fed)
    print(cpu_description())
    print(f"model {model_dir.name}: {len(TEXTS)} rows x {args.new_tokens} tokens, teacher-forced on fp32's greedy tokens")
    print(f"{'against fp32 (eeyore, eager)':<30}{'top-1 =':>10}{'differ':>8}{'largest gap':>14}{'mean |d|':>12}{'max |d|':>10}")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        full = theirs(torch.cat([prompt, fed], 1)).logits.float()
    compare("transformers bf16", full[:, args.prompt_len - 1:-1], ref)
    ours = Llama.from_pretrained(model_dir, dtype=torch.bfloat16)
    compiled = for_inference(ours, compile=not args.no_compile)
    compare("eeyore bf16 eager", decoded_logits(ours, DecodeStep(ours), prompt, fed), ref)
    if not args.no_compile:
        compare("eeyore bf16 compiled (frozen)", decoded_logits(ours, compiled, prompt, fed), ref)


if __name__ == "__main__":
    main()
