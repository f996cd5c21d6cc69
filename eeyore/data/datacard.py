"""The data card of an SFT set built by `build_sft`: README.md with counts and distributions,
and the PNG charts it shows."""
from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from eeyore.profile import (
    DEPRESSION, DEPRESSION_LEVELS, DISTORTIONS, IDEATION_LEVELS, SUICIDAL, SYMPTOM_LEVELS, SYMPTOMS, is_exhibited,
    read_level,
)


def _summary(values: list[int]) -> str:
    if not values:
        return "| – | – | – | – | – |"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"| {ordered[0]} | {statistics.median(ordered):g} | {statistics.mean(ordered):.1f} | {p90} | {ordered[-1]} |"


def _label(value: str, levels: tuple[str, ...]) -> str:
    read = read_level(value, levels)
    return "unreadable" if read is None else levels[read[0]]


def distributions(records: list[dict[str, Any]]) -> dict[str, Counter]:
    """Counts over the written records: symptoms and distortions exhibited, levels of each scale."""
    out = {"symptoms": Counter(), "distortions": Counter(), "symptom levels": Counter(),
           DEPRESSION: Counter(), SUICIDAL: Counter()}
    for r in records:
        fields = r["profile"]
        for name, value in fields[SYMPTOMS].items():
            level = _label(value, SYMPTOM_LEVELS)
            out["symptom levels"][level] += 1
            if level not in ("Not exhibited", "unreadable"):
                out["symptoms"][name] += 1
        out["distortions"].update(k for k, v in fields[DISTORTIONS].items() if is_exhibited(v))
        out[DEPRESSION][_label(fields[DEPRESSION], DEPRESSION_LEVELS)] += 1
        out[SUICIDAL][_label(fields[SUICIDAL], IDEATION_LEVELS)] += 1
    return out


def _table(counter: Counter, head: str, order: tuple[str, ...] = ()) -> list[str]:
    keys = [k for k in order if k in counter] + [k for k, _ in counter.most_common() if k not in order]
    return [f"| {head} | records |", "|---|---:|", *(f"| {k} | {counter[k]} |" for k in keys), ""]


def charts(out: Path, turns: list[int], tokens: list[int], dist: dict[str, Counter]) -> list[str]:
    """Write the PNG charts into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].hist(turns or [0], bins=20, color="#4c72b0")
    axes[0].set(title="client turns per conversation", xlabel="turns", ylabel="conversations")
    axes[1].hist(tokens or [0], bins=20, color="#55a868")
    axes[1].set(title="tokens per record (as trained)", xlabel="tokens", ylabel="conversations")
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    traits = dist["symptoms"].most_common() + [(f"[distortion] {k}", v) for k, v in dist["distortions"].most_common()]
    axes[0].barh([k[:60] for k, _ in traits], [v for _, v in traits], color="#c44e52")
    axes[0].invert_yaxis()
    axes[0].tick_params(axis="y", labelsize=7)
    axes[0].set(title="traits exhibited", xlabel="records")
    for ax, name, levels in ((axes[1], "symptom levels", SYMPTOM_LEVELS), (axes[2], DEPRESSION, DEPRESSION_LEVELS)):
        keys = [k for k in (*levels, "unreadable") if dist[name][k]]
        ax.bar(keys, [dist[name][k] for k in keys], color="#8172b2")
        ax.set(title=name)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "traits.png", dpi=100)
    plt.close(fig)
    return ["lengths.png", "traits.png"]


def card(counts: dict[str, int], turns: list[int], tokens: list[int], records: list[dict[str, Any]],
         settings: dict[str, Any], images: list[str]) -> str:
    """The README.md text."""
    dist = distributions(records)
    lines = [
        "# SFT data card", "",
        "Built by `python -m eeyore.data.build_sft`: each record is one real conversation whose system prompt "
        "is the client's extracted profile rendered as training renders it; the client speaks as `assistant`, "
        "the counsellor as `user`.", "",
        "Train with: `python -m eeyore.train.sft --dataset train.jsonl --input_key messages "
        f"--apply_chat_template --multiturn --max_len {settings['max_tokens']}`", "",
        "## Settings", "", *(f"- {k}: `{v}`" for k, v in settings.items()), "",
        "## Counts", "", "| | conversations |", "|---|---:|", *(f"| {k} | {v} |" for k, v in counts.items()), "",
        "## Lengths", "", "| per record | min | median | mean | p90 | max |", "|---|---:|---:|---:|---:|---:|",
        "| client turns " + _summary(turns),
        "| all turns (no system) " + _summary([len(r["messages"]) - 1 for r in records]),
        "| tokens " + _summary(tokens), "",
        "## Traits", "", *_table(dist["symptoms"], "symptom (any severity)"),
        *_table(dist["distortions"], "cognitive distortion (exhibited)"),
        "## Severities", "", *_table(dist["symptom levels"], "symptom level (all 18 per record)", SYMPTOM_LEVELS),
        *_table(dist[DEPRESSION], DEPRESSION, DEPRESSION_LEVELS), *_table(dist[SUICIDAL], SUICIDAL, IDEATION_LEVELS),
        "## Charts", "", *(f"![{name[:-4]}]({name})" for name in images), "",
    ]
    return "\n".join(lines)
