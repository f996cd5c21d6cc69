"""One SFT optimizer step of eeyore against transformers, and the loss alone against full logits.

    python bench/train_bench.py                     # SmolLM2-135M-Instruct, 4 x 512 real tokens, fp32
    python bench/train_bench.py --model DIR --batch 2 --seq 1024 --threads 2
    python bench/train_bench.py --only packing --batch 4   # --packing_samples against padding, 12 real conversations
    python bench/train_bench.py --mfu               # CUDA only: MFU of a Llama-3.2-1B-shaped model, bf16
    python bench/train_bench.py --only variants     # full fine-tune vs LoRA rank 16 vs --adam_offload

Variants: the same SFT step (our trainer, same batch) as a full fine-tune, with LoRA adapters of
rank 16 on every projection (only they train), and with --adam_offload (weights, gradients and
AdamW on the CPU: on a CPU-only machine that is where they already are, so only a GPU shows the
saving). Peak memory here covers loading the model, the warm-up step (which creates the
optimizer state) and the measured steps, above the level before loading.

Step: both sides train the same model on the same batch of real conversations (the shared test
set, ChatML, assistant-only targets): eeyore is `Trainer.train_step` (FSDP2 over a world of one,
sliced cross-entropy, clipping, AdamW); transformers is `model(input_ids, labels=...)`, backward,
`clip_grad_norm_`, AdamW. They alternate; time is the median of --steps steps after one warm-up.
Packing: one step over all 12 real conversations (whole, up to --packing-max-len) in micro-batches
of --batch, padded and with `--packing_samples`, alternating, at learning rate 0 so both sides
always see the same weights; tokens/s counts real tokens and the first losses must agree.
Loss: fp32 forward + backward of the loss of `hidden [seq, H] @ W.T` over a 128256 vocabulary,
sliced against `F.cross_entropy` on the full logits.

Peak memory on CPU is the highest resident set size seen (sampled every 0.5 ms by a thread) above
the size when the measured call starts; glibc is told to return freed blocks at once so the
resident size follows live memory. On CUDA it is `torch.cuda.max_memory_allocated` above the start.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eeyore.model import Llama, LlamaConfig
from eeyore.model.chat import ChatTemplate
from eeyore.model.fastpath import speed_up
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.pretrained import resolve_model_dir
from eeyore.train import sft
from eeyore.train.data import Row
from eeyore.train.loss import IGNORE_INDEX, cross_entropy_sum
from eeyore.train.parallel import data_parallel_mesh, init_distributed, load_sharded, shard_model
from eeyore.train.trainer import Trainer, lora_spec
from eeyore.train.tokens import Batch, Example
from machine import cpu_description

PROFILES = Path(__file__).resolve().parents[2] / "shared/data/eeyore_test_profiles.json"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


class PeakMemory:
    """Bytes above the starting level at the highest point inside the `with` block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.0005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._start


def release_freed_memory_at_once() -> None:
    """glibc keeps freed blocks below its (growing) mmap threshold; fix the threshold low instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def real_batch(tok: Tokenizer, batch: int, seq: int) -> Batch:
    """The first `seq` tokens of `batch` real conversations (profile system prompt first)."""
    conversations = [r["conversation"] for r in json.loads(PROFILES.read_text())]
    fmt = sft.SFTFormat("messages", None, True, True, 1 << 30)
    chat = ChatTemplate.for_tokenizer(tok)
    examples = [sft.make_example(Row({"messages": conv}, "profiles"), tok, chat, fmt) for conv in conversations]
    cut = [Example(e.input_ids[:seq], e.labels[:seq]) for e in examples if len(e.input_ids) >= seq]
    if len(cut) < batch:
        raise SystemExit(f"only {len(cut)} conversations reach {seq} tokens; lower --seq or --batch")
    return sft.collate(cut[:batch], tok.pad_id if tok.pad_id is not None else tok.eos_ids[0])


def bench_step(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(model_dir)
    batch = real_batch(tok, args.batch, args.seq)
    labels = torch.cat([torch.full((args.batch, 1), IGNORE_INDEX), batch.targets[:, :-1]], 1)  # transformers shifts them itself

    d = init_distributed()
    ours = load_sharded(str(model_dir), d, zero_stage=2)
    speed_up(ours, cpu_matmul=args.cpu_matmul)  # as the trainers do at start (--cpu_matmul)
    flags = ["--dataset", "-", "--train_batch_size", str(args.batch), "--micro_train_batch_size", str(args.batch), "--l2", "0.01"]
    flags += ["--deepcompile"] if args.deepcompile else []
    trainer = Trainer(sft.parse_args(flags), d, ours, tok, sft.SFTRecipe(0), [None] * args.batch)

    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theirs.train()
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=5e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

    def their_step() -> None:
        theirs(input_ids=batch.input_ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"transformers": their_step, "eeyore": lambda: trainer.train_step([batch])}
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, int] = {}
    for name, fn in steps.items():  # warm-up: optimizer state exists before anything is measured
        fn()
    for _ in range(args.steps):
        for name, fn in steps.items():
            with PeakMemory(torch.device("cpu")) as mem:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0), mem.peak)
    print(cpu_description())
    print(f"one optimizer step: {model_dir.name}, {args.batch} x {args.seq} tokens of real conversations, fp32, {torch.get_num_threads()} threads")
    rate = {k: batch.tokens / statistics.median(v) for k, v in times.items()}
    print(f"{'':14}{'tokens/s':>12}{'peak MiB':>12}")
    for name in steps:
        print(f"{name:14}{rate[name]:12.0f}{peaks[name] / 2**20:12.0f}")
    print(f"{'ratio':14}{rate['eeyore'] / rate['transformers']:11.2f}x{peaks['eeyore'] / peaks['transformers']:11.2f}x")


def bench_variants(args: argparse.Namespace) -> None:
    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(model_dir)
    batch = real_batch(tok, args.batch, args.seq)
    d = init_distributed()
    common = ["--pretrain", str(model_dir), "--dataset", "-", "--train_batch_size", str(args.batch),
              "--micro_train_batch_size", str(args.batch), "--l2", "0.01"]
    variants = {"full": [], "lora r16": ["--lora_rank", "16", "--lora_alpha", "32"], "adam_offload": ["--adam_offload"]}
    device = d.device
    result: dict[str, tuple[float, int, int]] = {}
    for name, extra in variants.items():
        cfg = sft.parse_args(common + extra)
        gc.collect()
        with PeakMemory(device) as mem:
            model = load_sharded(cfg.pretrain, d, cfg.zero_stage, cfg.bf16, lora=lora_spec(cfg), cpu_offload=cfg.adam_offload)
            speed_up(model, cfg.kernels, cfg.cpu_matmul)
            trainer = Trainer(cfg, d, model, tok, sft.SFTRecipe(0), [None] * args.batch)
            trainer.train_step([batch])  # warm-up: the optimizer state exists from here on
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                trainer.train_step([batch])
                times.append(time.perf_counter() - start)
        trainable = sum(p.numel() for p in trainer.params)
        result[name] = (batch.tokens / statistics.median(times), mem.peak, trainable)
        del model, trainer
        if name == "full":
            print(f"SFT step variants: {model_dir.name}, {args.batch} x {args.seq} tokens of real conversations, fp32, "
                  f"{torch.get_num_threads()} threads, {device.type}")
            print(f"{'':14}{'tokens/s':>12}{'peak MiB':>12}{'trained':>14}{'speed':>9}{'memory':>9}")
        rate, peak, _ = result[name]
        full_rate, full_peak, _ = result["full"]
        print(f"{name:14}{rate:12.1f}{peak / 2**20:12.0f}{trainable:14,d}{rate / full_rate:8.2f}x{peak / full_peak:8.2f}x", flush=True)


def bench_loss(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.loss_seq, args.loss_hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.loss_vocab, args.loss_hidden, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, args.loss_vocab, (args.loss_seq,), generator=g)

    def naive() -> None:
        F.cross_entropy((hidden @ weight.t()).float(), targets).backward()

    def ours() -> None:
        total, count = cross_entropy_sum(hidden, weight, targets)
        (total / count).backward()

    print(f"\nloss forward + backward: {args.loss_seq} tokens x vocabulary {args.loss_vocab}, hidden {args.loss_hidden}, fp32, every token a target")
    print(f"{'':14}{'seconds':>12}{'peak MiB':>12}")
    result: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):  # alternate, keep the fastest time and the highest peak of each
        for name, fn in (("full logits", naive), ("eeyore", ours)):
            hidden.grad = weight.grad = None
            with PeakMemory(torch.device("cpu")) as mem:
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
            best, peak = result.get(name, (float("inf"), 0))
            result[name] = (min(best, seconds), max(peak, mem.peak))
    for name, (seconds, peak) in result.items():
        print(f"{name:14}{seconds:12.2f}{peak / 2**20:12.0f}")
    (t0, m0), (t1, m1) = result["full logits"], result["eeyore"]
    print(f"{'ratio':14}{t0 / t1:11.2f}x{m1 / m0:11.2f}x   (speed-up, memory fraction)")


def bench_packing(args: argparse.Namespace) -> None:
    """One SFT step over the 12 real conversations, padded micro-batches against packed ones."""
    if not PROFILES.is_file():
        print(f"packing: skipped, {PROFILES} is not available")
        return
    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(model_dir)
    fmt, chat, cut = sft.SFTFormat("messages", None, True, True, 1 << 30), ChatTemplate.for_tokenizer(tok), args.packing_max_len
    conversations = [r["conversation"] for r in json.loads(PROFILES.read_text())]
    whole = [sft.make_example(Row({"messages": c}, "profiles"), tok, chat, fmt) for c in conversations]
    # the first --packing-fraction of each conversation (keeps their unequal lengths), at most --packing-max-len tokens
    keep = [min(cut, max(2, round(len(e.input_ids) * args.packing_fraction))) for e in whole]
    examples = [Example(e.input_ids[:n], e.labels[:n]) for e, n in zip(whole, keep)]
    examples = examples[: len(examples) - len(examples) % args.batch]
    d = init_distributed()
    model = load_sharded(str(model_dir), d, zero_stage=2)
    # learning rate 0: the weights never change, so every step of either side sees the same model
    flags = ["--dataset", "-", "--train_batch_size", str(len(examples)), "--micro_train_batch_size", str(args.batch), "--learning_rate", "0"]
    trainer = Trainer(sft.parse_args(flags), d, model, tok, sft.SFTRecipe(0), examples)
    groups = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]
    sides = {"padded": sft.SFTRecipe(tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]), "packed": sft.SFTRecipe(0, packing=True)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(args.steps):  # alternate the sides: the machine's background load drifts
        for name, recipe in sides.items():
            runs[name].append(trainer.train_step([recipe.collate(g) for g in groups]))
    real = sum(len(e.input_ids) for e in examples)
    padded = sum(len(g) * max(len(e.input_ids) for e in g) for g in groups)
    print(f"\nSFT step, {len(examples)} real conversations ({real} tokens, {padded} when padded), micro-batches of {args.batch}, "
          f"max_len {args.packing_max_len}, fraction {args.packing_fraction}, {model_dir.name}, fp32, {torch.get_num_threads()} threads, median of {args.steps}")
    rate = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    for name, v in runs.items():
        print(f"{name:10}{rate[name]:10.0f} tokens/s   loss {v[0]['loss']:.6f}")
    print(f"{'ratio':10}{rate['packed'] / rate['padded']:9.2f}x   loss difference {abs(runs['packed'][0]['loss'] - runs['padded'][0]['loss']):.2e}")


LLAMA_1B = dict(  # Llama-3.2-1B's shape
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="float32",
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def sft_step_seconds(config: LlamaConfig, batch: int, seq: int, steps: int, bf16: bool) -> tuple[float, int]:
    """Seconds per SFT optimizer step (FSDP2, world of one) on random weights and tokens, and the
    parameter count. Two warm-up steps first; the device is the one `init_distributed` picks."""
    d = init_distributed()
    with torch.device("meta"):
        model = Llama(config)
    shard_model(model, data_parallel_mesh(d, 2), 2, bf16=bf16, gradient_checkpointing=False)
    model.to_empty(device=d.device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.generation_config = {}
    flags = ["--dataset", "-", "--train_batch_size", str(batch), "--micro_train_batch_size", str(batch)] + (["--bf16"] if bf16 else [])
    trainer = Trainer(sft.parse_args(flags), d, model, None, sft.SFTRecipe(0), [None] * batch)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    micro = Batch(ids, ids.roll(-1, 1), torch.full((batch,), seq))
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        trainer.train_step([micro])
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([micro])
    sync()
    return (time.perf_counter() - start) / steps, sum(p.numel() for p in model.parameters())


def training_flops_per_token(config: LlamaConfig, params: int, seq: int) -> float:
    """PaLM's count: 6 FLOPs per parameter per token (the tied head counted once, the embedding
    lookup is free but its matrix is the head's), plus attention's 12 * layers * width * length."""
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq


def peak_bf16_flops(override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def bench_mfu(args: argparse.Namespace) -> None:
    """Model FLOPs utilisation of our bf16 training step on a Llama-3.2-1B-shaped model (random weights)."""
    if not torch.cuda.is_available():
        raise SystemExit("--mfu needs a CUDA device")
    peak = peak_bf16_flops(args.peak_tflops)
    if peak is None:
        raise SystemExit(f"unknown peak bf16 FLOP/s for {torch.cuda.get_device_name()}: pass --peak-tflops")
    config = LlamaConfig(**LLAMA_1B)
    seconds, params = sft_step_seconds(config, args.batch, args.seq, args.steps, bf16=True)
    tokens = args.batch * args.seq
    mfu = training_flops_per_token(config, params, args.seq) * tokens / seconds / peak
    print(f"MFU on {torch.cuda.get_device_name()}: {mfu:.1%} ({tokens / seconds:.0f} tokens/s, {args.batch} x {args.seq}, bf16, peak {peak / 1e12:.0f} TFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir or hub id for the step benchmark (default: the embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (real conversations cut to this length)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side (median)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side of the loss benchmark (fastest kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    parser.add_argument("--loss-seq", type=int, default=4096, help="tokens of the loss benchmark")
    parser.add_argument("--loss-vocab", type=int, default=128256, help="vocabulary of the loss benchmark")
    parser.add_argument("--loss-hidden", type=int, default=2048, help="hidden size of the loss benchmark (Llama-3.2-1B's)")
    parser.add_argument("--cpu-matmul", default="auto", help="auto (measured at start), blas, onednn (default auto)")
    parser.add_argument("--only", choices=("step", "loss", "packing", "variants"), default=None, help="run one of the CPU benchmarks (variants: full vs LoRA vs --adam_offload; not in the default run)")
    parser.add_argument("--packing-max-len", type=int, default=2048, help="--max_len of the packing benchmark's conversations")
    parser.add_argument("--packing-fraction", type=float, default=1.0, help="packing benchmark: keep the first fraction of each conversation (a quicker run, same spread of lengths)")
    parser.add_argument("--deepcompile", action="store_true", help="step benchmark: our trainer with --deepcompile (each "
                        "block through torch.compile; its first steps compile, outside the timing) (default off)")
    parser.add_argument("--mfu", action="store_true", help="CUDA only: MFU of a Llama-3.2-1B-shaped model in bf16 (uses --batch, --seq, --steps)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, when not an H100/H200/A100")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mfu:
        bench_mfu(args)
        return
    release_freed_memory_at_once()
    if args.only in (None, "step"):
        bench_step(args)
    if args.only in (None, "loss"):
        bench_loss(args)
    if args.only in (None, "packing"):
        bench_packing(args)
    if args.only == "variants":
        bench_variants(args)


if __name__ == "__main__":
    main()
