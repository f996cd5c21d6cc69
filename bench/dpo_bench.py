"""One DPO optimizer step: ours (reference resident, and --ref_offload) against a plain
transformers DPO step, on the same checkpoint and the same batch of real conversations.

    python bench/dpo_bench.py                                  # embedded SmolLM2-135M, fp32
    python bench/dpo_bench.py --model DIR --pairs 4 --max_len 1024 --bf16   # on a GPU

Speed: the three configurations live in this one process and take their steps in turn
(transformers, ours, ours with --ref_offload, transformers, ...), so a machine shared with
other work slows all of them alike; the table gives the median step. Memory: each
configuration then runs two steps in a fresh process, so its peak is its own: on CUDA the peak
of allocated accelerator memory, on CPU the peak resident memory over the process's resident
memory once torch is imported (`--no_memory` skips this). Tokens/s counts the real
(non-padding) tokens of chosen and rejected sequences per step, the same count on both sides.

Ours is the real training path: `Trainer.train_step` on a world of one with `DPORecipe`
(concatenated forward, response-only log-probs, AdamW, clipping). The transformers step is
the textbook one: policy and reference `LlamaForCausalLM`, one concatenated padded forward
each, full-vocabulary log-softmax, masked sums, sigmoid DPO loss, clipping, AdamW.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared/data/eeyore_test_profiles.json"
CONFIGS = ("transformers", "ours", "ours_ref_offload")


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB. (Not getrusage: its peak survives fork and exec,
    so a child of a big parent would report the parent's peak.)"""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _peak_mb(baseline_mb: float, device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM") - baseline_mb


def make_pairs(model_dir: Path, n: int, max_len: int):
    """Prompt = a real conversation (system prompt included) up to its first client turn;
    chosen = that turn; rejected = the first client turn of the next conversation."""
    from eeyore.model.chat import ChatTemplate
    from eeyore.model.tokenizer import Tokenizer
    from eeyore.train.data import Row
    from eeyore.train.dpo_data import PreferenceFormat, build_pairs

    conversations = [r["conversation"] for r in json.loads(SHARED.read_text())]
    rows = []
    for i, conv in enumerate(conversations):
        j = next(k for k, m in enumerate(conv) if m["role"] == "assistant")
        other = conversations[(i + 1) % len(conversations)]
        rejected = next(m for m in other if m["role"] == "assistant")
        rows.append(Row({"prompt": conv[:j], "chosen": [conv[j]], "rejected": [rejected]}, f"conversation {i}"))
    tok = Tokenizer.from_pretrained(model_dir)
    pairs, _ = build_pairs(rows, tok, PreferenceFormat("prompt", apply_chat_template=True), max_len,
                           ChatTemplate.for_tokenizer(tok), show=False)
    if len(pairs) < n:
        sys.exit(f"only {len(pairs)} pairs fit --max_len {max_len}")
    return tok, pairs[:n]


def ours(args: argparse.Namespace, offload: bool):
    """A closure running one step of our DPO training, and the batch's token count."""
    from eeyore.train import dpo
    from eeyore.train.parallel import init_distributed, load_sharded
    from eeyore.train.trainer import Trainer

    d = init_distributed()
    tok, pairs = make_pairs(Path(args.model), args.pairs, args.max_len)
    flags = ["--pretrain", args.model, "--dataset", "-", "--train_batch_size", str(args.pairs),
             "--micro_train_batch_size", str(args.pairs), "--learning_rate", "1e-6", "--save_path", "/tmp/eeyore_dpo_bench"]
    flags += ["--bf16"] * args.bf16 + ["--gradient_checkpointing"] * args.gradient_checkpointing
    targs = dpo.parse_args(flags)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]
    model = load_sharded(args.model, d, targs.zero_stage, targs.bf16, targs.gradient_checkpointing)
    reference = None
    if offload:  # what `dpo.train` does: the policy scores the reference side before training
        dpo.precompute_reference(model, pairs, args.pairs, pad_id, d)
    else:
        reference = dpo.load_reference(targs, d)
    recipe = dpo.DPORecipe(dpo.loss_config(targs), pad_id, reference)
    trainer = Trainer(targs, d, model, tok, recipe, pairs)
    batch = recipe.collate(pairs)
    return (lambda: trainer.train_step([batch])["loss"]), batch.tokens, d.device


def transformers_dpo(args: argparse.Namespace):
    """The same step written plainly with transformers."""
    import torch.nn.functional as F
    import transformers

    from eeyore.train.dpo_data import collate_pairs
    from eeyore.train.loss import IGNORE_INDEX

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok, pairs = make_pairs(Path(args.model), args.pairs, args.max_len)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device)
    policy, reference = load().train(), load().eval().requires_grad_(False)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8)
    batch = collate_pairs(pairs, tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]).to(device)
    attention = torch.arange(batch.input_ids.shape[1], device=device)[None] < batch.lengths[:, None]
    # position t predicts targets[t] (the last position never has one): the same targets as ours
    mask = batch.targets[:, :-1] != IGNORE_INDEX
    targets = batch.targets[:, :-1].clamp(min=0)
    n = batch.pairs

    def summed_logps(model) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=attention).logits[:, :-1].float()
        token = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        return (token * mask).sum(-1)

    def step() -> float:
        with torch.no_grad():
            ref = summed_logps(reference)
        pol = summed_logps(policy)
        z = (pol[:n] - pol[n:]) - (ref[:n] - ref[n:])
        loss = -F.logsigmoid(0.1 * z).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, batch.tokens, device


def build(args: argparse.Namespace, config: str):
    return transformers_dpo(args) if config == "transformers" else ours(args, config == "ours_ref_offload")


def timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def peak_memory(args: argparse.Namespace, config: str) -> float:
    """Peak memory (MiB) of two steps of `config`, in this (fresh) process."""
    baseline = _status_mb("VmRSS")
    step, _, device = build(args, config)
    for _ in range(2):
        step()
    return _peak_mb(baseline, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (one micro-batch)")
    p.add_argument("--max_len", type=int, default=512, help="tokens per sequence at most")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (CUDA)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward, both sides")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--memory_of", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: one memory run
    args = p.parse_args()
    if args.model is None:
        from eeyore.model.pretrained import resolve_model_dir

        args.model = str(resolve_model_dir(None))
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory(args, args.memory_of)}))
        return

    steppers = {config: build(args, config) for config in CONFIGS}
    times: dict[str, list[float]] = {config: [] for config in CONFIGS}
    losses: dict[str, float] = {}
    for round_ in range(args.warmup + args.steps):
        for config, (step, _, device) in steppers.items():
            seconds = timed(step, device)
            if round_ >= args.warmup:
                times[config].append(seconds)
    for config, (step, _, device) in steppers.items():
        losses[config] = step()  # same number of updates on every side: comparable losses
    memory = {config: float("nan") for config in CONFIGS}
    if not args.no_memory:
        for config in CONFIGS:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--model", args.model, "--memory_of", config]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"memory run of {config} failed:\n{done.stderr[-3000:]}")
            memory[config] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]

    tokens = steppers["transformers"][1]
    device = steppers["transformers"][2].type
    step_s = {config: statistics.median(t) for config, t in times.items()}
    unit = "peak accelerator MiB" if device == "cuda" else "peak RSS over baseline MiB"
    print(f"model {args.model} | {args.pairs} pairs, {tokens} tokens per step | {device}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'config':<18} {'tokens/s':>10} {'x transformers':>15} {'step s':>8} {unit:>28} {'loss':>8}")
    for config in CONFIGS:
        print(f"{config:<18} {tokens / step_s[config]:>10.1f} {step_s['transformers'] / step_s[config]:>15.2f} "
              f"{step_s[config]:>8.2f} {memory[config]:>28.0f} {losses[config]:>8.4f}")
    print(f"--ref_offload saves {memory['ours'] - memory['ours_ref_offload']:.0f} MiB of peak memory")


if __name__ == "__main__":
    main()
