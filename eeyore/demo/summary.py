"""The demo's last word: one screen that says what each stage produced, read from its files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: the stages import this module
    from eeyore.demo.stages import Demo


def read_log(path: Path) -> list[dict]:
    """A trainer's train_log.jsonl (one JSON object per optimizer step)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def training_chart(demo: Demo) -> Path | None:
    """The SFT loss and the DPO loss and reward margin per step, as one PNG beside the report."""
    logs = {name: read_log(demo.models[name] / "train_log.jsonl") for name in ("sft", "dpo")}
    if not any(logs.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (name, rows) in zip(axes, logs.items()):
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r.get("loss") for r in rows], marker="o", label="loss")
        if name == "dpo" and rows and "reward_margin" in rows[0]:
            ax.plot(steps, [r["reward_margin"] for r in rows], marker="s", label="reward margin")
        ax.set_title(f"{name.upper()} ({len(rows)} steps)")
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.tight_layout()
    out = demo.path("report", "training.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary(demo: Demo, timings: dict[str, float]) -> str:
    lines = ["", "=" * 72, "Eeyore demo: summary", "=" * 72]
    sft_log = read_log(demo.models["sft"] / "train_log.jsonl")
    dpo_log = read_log(demo.models["dpo"] / "train_log.jsonl")
    if sft_log:
        lines.append(f"SFT  {len(sft_log)} steps, loss {sft_log[0]['loss']:.3f} -> {sft_log[-1]['loss']:.3f}")
    if dpo_log:
        acc = _mean([r["reward_accuracy"] for r in dpo_log if "reward_accuracy" in r])
        lines.append(f"DPO  {len(dpo_log)} steps, loss {dpo_log[0]['loss']:.3f} -> {dpo_log[-1]['loss']:.3f}, "
                     f"mean reward accuracy {_fmt(acc)}")
    lines += ["", f"{'model':<6} {'adherence 1-5 (n)':<20} {'authenticity 0-100':<19}"]
    for name in demo.models:
        path = demo.path("eval", name, "results.json")
        if not path.is_file():
            lines.append(f"{name:<6} (not evaluated)")
            continue
        res = json.loads(path.read_text())
        adh = res["adherence"]["all"]
        auth = res["authenticity"].get("free") or res["authenticity"].get("interview") or {}
        lines.append(f"{name:<6} {_fmt(adh['mean']) + ' (' + str(adh['n']) + ')':<20} {_fmt(auth.get('score'), '.1f'):<19}")
    lines += ["", "stage times (s): " + ", ".join(f"{n} {t:.0f}" for n, t in timings.items()),
              f"total {sum(timings.values()):.0f} s",
              f"report: {demo.path('report', 'report.md')}", f"every artifact: {demo.out}",
              "(a 135M-parameter model trained for minutes: the numbers show the method runs, not how well it works)"]
    return "\n".join(lines)
