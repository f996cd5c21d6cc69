"""`python -m eeyore.eval.report RUN...`: compare evaluation runs in one Markdown report with
PNG charts (per-category adherence with 95% intervals; each authenticity metric's per-turn
distribution for every run beside the real clients')."""
from __future__ import annotations

import argparse
import json
import os
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
    missing = stat.get("missing") or 0
    if stat["mean"] is None:
        return f"no scores ({missing} missing)" if missing else "no scores"
    more = f", {missing} missing" if missing else ""
    return f"{stat['mean']:.2f} [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}] (n={stat['n']}{more})"


SOURCES = {"interview": "the client's answers in the trait interviews",
           "free": "the client's turns in free conversations with the counsellor model"}


def authenticity_columns(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(run, source) for every set of client turns a run measured: its interviews, and its free
    conversations when it held them."""
    return [(r, source) for r in runs for source in SOURCES if source in r["authenticity"]]


def markdown(runs: list[dict[str, Any]], charts: list[str]) -> str:
    lines = ["# Evaluation report", "", "## Profile adherence", "",
             "Judge score 1-5 (5 = fully consistent with the profile): mean [95% bootstrap CI] (n scored, and how "
             "many judgements held no usable score). 'no scores' means no judgement of that category was usable.", "",
             "| run | experiment | model | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for r in runs:
        cfg = r["config"]
        cells = " | ".join(_cell(r["adherence"][c]) for c in COLUMNS)
        lines.append(f"| {r['_name']} | {cfg['experiment']} | {cfg['model']} | {cells} |")
    lines += _authenticity_lines(runs)
    if any(r.get("realism") is not None for r in runs):
        lines += ["", "## Realism (judge, free conversations)", "", "| run | realism 1-5 |", "|---|---|"]
        lines += [f"| {r['_name']} | {_cell(r['realism'])} |" for r in runs if r.get("realism") is not None]
    lines += ["", "## Runs", "", "Wall time and requests are summed over the invocations that ran sessions "
              "(sessions found in the cache cost nothing).", "",
              "| run | sessions done | failed | invocations | wall s | requests | requests/s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        t, s = r.get("timing") or {}, r.get("sessions") or {}
        rps = f"{t['requests_per_s']:.2f}" if t.get("requests_per_s") else "–"
        wall = f"{t['wall_s']:.1f}" if t.get("wall_s") is not None else "–"
        lines.append(f"| {r['_name']} | {s.get('done')}/{s.get('total')} | {s.get('failed')} | "
                     f"{t.get('invocations', 1 if t else '–')} | {wall} | {t.get('requests', '–')} | {rps} |")
    failures = [(r["_name"], f) for r in runs for f in r.get("failures") or []]
    if failures:
        lines += ["", "## Failed sessions", "", "Not in any figure above; rerunning the same command retries them.", "",
                  "| run | profile | trait | error |", "|---|---|---|---|"]
        lines += [f"| {name} | {f['profile']} | {f.get('trait') or 'free conversation'} | {_md(f['error'])} |"
                  for name, f in failures]
    lines += [""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts]
    return "\n".join(lines) + "\n"


def _authenticity_lines(runs: list[dict[str, Any]]) -> list[str]:
    cols = authenticity_columns(runs)
    lines = ["", "## Linguistic authenticity", "",
             "Per metric: the simulated client's mean, and in brackets the Kolmogorov-Smirnov distance of its "
             "per-turn distribution to the real clients' (0 = same distribution). Score = 100 x (1 - mean distance). "
             "Each column names the turns it measures: " + "; ".join(f"({k}) {v}" for k, v in SOURCES.items()) + ".", "",
             "| metric | real | " + " | ".join(f"{r['_name']} ({source})" for r, source in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    auths = [r["authenticity"][source] for r, source in cols]
    real = runs[0]["authenticity"]["reference"]["metrics"]
    for m in METRICS:
        if m not in real:
            continue
        cells = [f"{a['metrics'][m]['simulated']:.2f} ({a['metrics'][m]['distance']:.2f})" if m in a["metrics"] else "–"
                 for a in auths]
        lines.append(f"| {m} | {sum(real[m]) / len(real[m]):.2f} | " + " | ".join(cells) + " |")
    scores = [f"**{a['score']:.1f}**" if a["score"] is not None else "no client turns" for a in auths]
    lines.append("| score | 100 | " + " | ".join(scores) + " |")
    turns = " | ".join(str(a["turns"]["simulated"]) for a in auths)
    lines.append(f"| client turns | {runs[0]['authenticity']['reference'].get('turns')} | {turns} |")
    return lines


def _md(text: str) -> str:
    """A table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def plot_adherence(runs: list[dict[str, Any]], path: Path) -> None:
    _save(adherence_figure(runs), path, 110)


def plot_authenticity(runs: list[dict[str, Any]], path: Path) -> None:
    _save(authenticity_figure(runs), path, 100)


def _save(fig: Any, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def adherence_figure(runs: list[dict[str, Any]]) -> Any:
    """Bars with 95% intervals, n printed on every bar; a category without a usable score gets no
    bar but the words "no scores", so it cannot be read as a score of zero."""
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(COLUMNS))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(runs):
        stats = [r["adherence"][c] for c in COLUMNS]
        xs = x + (i - (len(runs) - 1) / 2) * width
        means = [s["mean"] if s["mean"] is not None else np.nan for s in stats]
        err = [[m - s["ci"][0] if s["mean"] is not None else 0 for m, s in zip(means, stats)],
               [s["ci"][1] - m if s["mean"] is not None else 0 for m, s in zip(means, stats)]]
        bars = ax.bar(xs, means, width, yerr=err, capsize=3, label=r["_name"])
        color = bars.patches[0].get_facecolor()
        for xi, s in zip(xs, stats):
            if s["mean"] is None:
                ax.text(xi, 0.1, "no scores", rotation=90, ha="center", va="bottom", fontsize=7, color=color)
            else:
                ax.text(xi, s["ci"][1] + 0.05, f"n={s['n']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, COLUMNS)
    ax.set_ylim(0, 5.8)
    ax.set_ylabel("judge score (1-5)")
    ax.set_title("Profile adherence by category (95% bootstrap CI; n = judgements scored)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def authenticity_figure(runs: list[dict[str, Any]]) -> Any:
    """Per metric, boxes of the per-turn values: the real clients, then every run's interview
    turns and free-conversation turns, each box labelled with its source and n."""
    import matplotlib.pyplot as plt

    real = runs[0]["authenticity"]["reference"]["metrics"]
    metrics = [m for m in METRICS if m in real]
    cols = authenticity_columns(runs)
    ncols = 4
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        data, labels = [real[m]], [f"real clients\nn={len(real[m])}"]
        for r, source in cols:
            a = r["authenticity"][source]["metrics"].get(m)
            values = a["values"] if a else []
            data.append(values)
            labels.append(f"{r['_name']}\n{'interviews' if source == 'interview' else 'free conv.'} n={len(values)}")
        ax.boxplot([d if d else [float("nan")] for d in data], showfliers=False)
        for k, d in enumerate(data, start=1):
            if not d:
                ax.text(k, 0.5, "no turns", ha="center", va="center", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=6, ha="right")
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Authenticity metrics per client turn: real clients vs the simulated client's interview answers "
                 "and free-conversation turns")
    fig.tight_layout()
    return fig


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
    report, tmp = out / "report.md", out / "report.md.tmp"
    tmp.write_text(markdown(runs, charts))
    os.replace(tmp, report)  # a reader never sees half a report
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
