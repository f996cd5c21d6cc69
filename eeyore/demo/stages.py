"""The Eeyore method as the demo runs it: seven stages, each a few of the project's own commands.

    real conversations → extract profiles → SFT records → SFT → round-1 pairs → DPO → evaluate + report

A stage reads only files the stages before it wrote under the output folder, so an interrupted
demo restarts at the stage it stopped in (`__main__.py` keeps the list of finished ones).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from eeyore.demo.servers import run, serving
from eeyore.demo.summary import training_chart

PY = sys.executable


@dataclass(frozen=True)
class Settings:
    """How much work each stage does. `FULL` fits in about 20 minutes on a 2-core CPU."""
    sft_epochs: int
    max_len: int
    pair_turns: int          # client turns per conversation turned into round-1 pairs
    pair_tokens: int         # longest generated (rejected) reply
    dpo_epochs: int
    eval_profiles: int       # how many profiles the evaluator interviews
    eval_traits: int         # traits asked about per profile
    eval_tokens: int         # longest client reply in the interviews
    extract_tokens: int      # longest extraction reply (a whole profile as JSON)


FULL = Settings(sft_epochs=3, max_len=2048, pair_turns=4, pair_tokens=96, dpo_epochs=2,
                eval_profiles=5, eval_traits=3, eval_tokens=96, extract_tokens=1536)
FAST = Settings(sft_epochs=1, max_len=1024, pair_turns=1, pair_tokens=24, dpo_epochs=1,
                eval_profiles=2, eval_traits=1, eval_tokens=24, extract_tokens=384)


@dataclass
class Demo:
    out: Path
    base: Path               # the model the method starts from
    profiles: Path           # profiles with their real conversations (the evaluator's format)
    settings: Settings

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def log(self, name: str) -> Path:
        return self.path("logs", f"{name}.log")

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, "sft": self.path("models", "sft"), "dpo": self.path("models", "dpo")}


def extract(d: Demo) -> None:
    """Ask the base model for each client's profile (one request per conversation), then score the
    extracted profiles field by field against the profiles written by people."""
    data = d.path("data")
    with serving(d.base, "base", d.log("serve-extract")) as url:
        run([PY, "-m", "eeyore.data.extract_profiles", str(d.profiles), "--output", str(data / "profiles.jsonl"),
             "--base-url", url, "--model", "base", "--attempts", "2", "--concurrency", "8",
             "--max-tokens", str(d.settings.extract_tokens)])
    run([PY, "-m", "eeyore.data.agreement", str(data / "profiles.jsonl"), str(d.profiles),
         "--markdown", str(d.path("report", "agreement.md")), "--chart", str(d.path("report", "agreement.png"))])


def sft_records(d: Demo) -> None:
    """Training records: each conversation under its profile rendered as the system prompt. Where the
    small base model gave no valid profile, the written one stands in (in a real run an expert
    would fill it in on the studio's profiles page)."""
    data = d.path("data")
    extracted = read_jsonl(data / "profiles.jsonl")
    have = {r["conversation_id"] for r in extracted}
    records = json.loads(d.profiles.read_text())
    gold = [r for r in records if f"{r.get('source')} {r.get('id_source')}" not in have]
    write_jsonl(data / "profiles_for_sft.jsonl", extracted + gold)
    print(f"  {len(extracted)} extracted profiles, {len(gold)} written ones in place of rejected extractions")
    run([PY, "-m", "eeyore.data.build_sft", str(d.profiles), str(data / "profiles_for_sft.jsonl"),
         "--output", str(data / "sft"), "--tokenizer", str(d.base), "--max-tokens", str(d.settings.max_len)])


def sft(d: Demo) -> None:
    s = d.settings
    run([PY, "-m", "eeyore.train.sft",
         "--pretrain", str(d.base), "--dataset", str(d.path("data", "sft", "train.jsonl")),
         "--input_key", "messages", "--apply_chat_template", "--multiturn", "--max_len", str(s.max_len),
         "--train_batch_size", "2", "--micro_train_batch_size", "1", "--max_epochs", str(s.sft_epochs),
         "--learning_rate", "2e-5", "--lr_warmup_ratio", "0", "--zero_stage", "3",
         "--save_path", str(d.models["sft"]), "--ckpt_path", str(d.path("ckpt", "sft")),
         "--load_checkpoint", "--logging_steps", "1"])


def preferences(d: Demo) -> None:
    """Round 1: the real client turn (chosen) against the SFT model's reply under a perturbed profile."""
    s = d.settings
    run([PY, "-m", "eeyore.data.make_preferences", "--dataset", str(d.path("data", "sft", "train.jsonl")),
         "--local_model", str(d.models["sft"]), "--output", str(d.path("data", "pairs.jsonl")),
         "--turns_per_conversation", str(s.pair_turns), "--max_tokens", str(s.pair_tokens),
         "--concurrency", "8"])


def dpo(d: Demo) -> None:
    s = d.settings
    run([PY, "-m", "eeyore.train.dpo",
         "--pretrain", str(d.models["sft"]), "--dataset", str(d.path("data", "pairs.jsonl")), "--prompt_key", "prompt",
         "--apply_chat_template", "--max_len", str(s.max_len), "--beta", "0.1",
         "--train_batch_size", "2", "--micro_train_batch_size", "1", "--max_epochs", str(s.dpo_epochs),
         "--learning_rate", "5e-6", "--zero_stage", "3", "--ref_offload",
         "--save_path", str(d.models["dpo"]), "--ckpt_path", str(d.path("ckpt", "dpo")),
         "--load_checkpoint", "--logging_steps", "1"])


def evaluate(d: Demo) -> None:
    """Interview base, SFT and DPO models on the same profiles; the base model is the judge of all three."""
    s = d.settings
    with serving(d.base, "judge", d.log("serve-judge")) as judge:
        for name, model in d.models.items():
            with serving(model, name, d.log(f"serve-{name}")) as url:
                run([PY, "-m", "eeyore.eval", "--experiment-name", "eeyore", "--experiment-model", name,
                     "--base-url", url, "--api-key", "none", "--judger-model", "judge",
                     "--judger-base-url", judge, "--judger-api-key", "none",
                     "--profiles", str(d.profiles), "--end-index", str(s.eval_profiles),
                     "--max-traits", str(s.eval_traits), "--max-tokens", str(s.eval_tokens),
                     "--prompt-style", "train", "--concurrency", "8",
                     "--output-dir", str(d.path("eval")), "--run-name", name])


def report(d: Demo) -> None:
    runs = [str(d.path("eval", name)) for name in d.models]
    run([PY, "-m", "eeyore.eval.report", *runs, "--out", str(d.path("report"))])
    chart = training_chart(d)
    if chart:
        print(f"  training curves: {chart}")


STAGES = [
    ("extract", "Extract a profile from each conversation (base model as the extractor)", extract),
    ("sft-records", "Build SFT records: the rendered profile as system prompt", sft_records),
    ("sft", "Supervised fine-tuning", sft),
    ("preferences", "Round-1 preference pairs from perturbed profiles", preferences),
    ("dpo", "Direct preference optimisation (one round)", dpo),
    ("evaluate", "Evaluate base, SFT and DPO: profile adherence and authenticity", evaluate),
    ("report", "The report: Markdown and PNG charts", report),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
