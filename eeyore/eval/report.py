"""`python -m eeyore.eval.report RUN...`: compare evaluation runs in one Markdown report with
PNG charts (per-category adherence with 95% intervals; each authenticity metric's per-turn
distribution for every run beside the real clients')."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eeyore.eval.authenticity import METRICS
from eeyore.eval.runner import CATEGORIES

COLUMNS = (*CATEGORIES, "all")


def load_run(path: str | Path) -> dict[str, Any]:
    """A run's results.json, given the file or its run directory."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no results at {file} (give a results.json or the run directory holding one)") from None
    for key in ("config", "adherence", "authenticity"):
        if key not in data:
            raise ValueError(f"{file}: not an evaluation results file (no {key!r})")
    data["_name"] = data["config"].get("run_name") or file.parent.name
    return data


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.2f} [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}] (n={stat['n']})"


def authenticity_source(run: dict[str, Any]) -> str:
    """Free conversations when the run has them (the natural setting), else the interviews."""
    return "free" if "free" in run["authenticity"] else "interview"


def markdown(runs: list[dict[str, Any]], charts: list[str]) -> str:
    lines = ["# Evaluation report", "", "## Profile adherence", "",
             "Judge score 1-5 (5 = fully consistent with the profile): mean [95% bootstrap CI] (n scored).", "",
             "| run | experiment | model | " + " | ".join(COLUMNS) + " | missing |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for r in runs:
        cfg = r["config"]
        cells = " | ".join(_cell(r["adherence"][c]) for c in COLUMNS)
        lines.append(f"| {r['_name']} | {cfg['experiment']} | {cfg['model']} | {cells} | {r['adherence']['all']['missing']} |")
    lines += ["", "## Linguistic authenticity", "",
              "Per metric: the simulated client's mean, and in brackets the Kolmogorov-Smirnov distance of its "
              "per-turn distribution to the real clients' (0 = same distribution). Score = 100 x (1 - mean distance).", "",
              "| metric | real | " + " | ".join(f"{r['_name']} ({authenticity_source(r)})" for r in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    auths = [r["authenticity"][authenticity_source(r)] for r in runs]
    real = runs[0]["authenticity"]["reference"]["metrics"]
    for m in METRICS:
        if m not in real:
            continue
        cells = [f"{a['metrics'][m]['simulated']:.2f} ({a['metrics'][m]['distance']:.2f})" if m in a["metrics"] else "–"
                 for a in auths]
        lines.append(f"| {m} | {sum(real[m]) / len(real[m]):.2f} | " + " | ".join(cells) + " |")
    scores = [f"**{a['score']:.1f}**" if a["score"] is not None else "–" for a in auths]
    lines.append("| score | 100 | " + " | ".join(scores) + " |")
    turns = " | ".join(str(a["turns"]["simulated"]) for a in auths)
    lines.append(f"| client turns | {runs[0]['authenticity']['reference'].get('turns')} | {turns} |")
    if any(r.get("realism") for r in runs):
        lines += ["", "## Realism (judge, free conversations)", "", "| run | realism 1-5 | missing |", "|---|---|---|"]
        lines += [f"| {r['_name']} | {_cell(r['realism'])} | {r['realism']['missing']} |" for r in runs if r.get("realism")]
    lines += ["", "## Runs", "", "| run | sessions | failed | wall s | requests/s |", "|---|---|---|---|---|"]
    for r in runs:
        t, s = r.get("timing", {}), r.get("sessions", {})
        rps = f"{t['requests_per_s']:.2f}" if t.get("requests_per_s") else "–"
        lines.append(f"| {r['_name']} | {s.get('done')}/{s.get('total')} | {s.get('failed')} | {t.get('wall_s', 0):.1f} | {rps} |")
    lines += [""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts]
    return "\n".join(lines) + "\n"


def plot_adherence(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(COLUMNS))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(runs):
        stats = [r["adherence"][c] for c in COLUMNS]
        means = [s["mean"] if s["mean"] is not None else np.nan for s in stats]
        err = [[m - s["ci"][0] if s["mean"] is not None else 0 for m, s in zip(means, stats)],
               [s["ci"][1] - m if s["mean"] is not None else 0 for m, s in zip(means, stats)]]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=r["_name"])
    ax.set_xticks(x, COLUMNS)
    ax.set_ylim(0, 5.5)
    ax.set_ylabel("judge score (1-5)")
    ax.set_title("Profile adherence by category (95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_authenticity(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    real = runs[0]["authenticity"]["reference"]["metrics"]
    metrics = [m for m in METRICS if m in real]
    cols = 4
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        data, labels = [real[m]], ["real"]
        for r in runs:
            a = r["authenticity"][authenticity_source(r)]["metrics"].get(m)
            data.append(a["values"] if a else [])
            labels.append(r["_name"])
        ax.boxplot([d if d else [float("nan")] for d in data], showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=7, ha="right")
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Authenticity metrics per client turn: real clients vs simulated")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_paths: list[str | Path], out_dir: str | Path) -> Path:
    runs = [load_run(p) for p in run_paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or eeyore[eval]): writing the report without charts",
              file=sys.stderr)
    else:
        plot_adherence(runs, out / "adherence.png")
        plot_authenticity(runs, out / "authenticity.png")
        charts = [str(out / "adherence.png"), str(out / "authenticity.png")]
    report = out / "report.md"
    report.write_text(markdown(runs, charts))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eeyore.eval.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="results.json files or run directories of `python -m eeyore.eval`")
    p.add_argument("--out", default="runs/eval/report", help="directory for report.md and the charts (default runs/eval/report)")
    a = p.parse_args(argv)
    try:
        path = write_report(a.runs, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
