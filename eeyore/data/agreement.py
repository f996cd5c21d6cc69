"""How well extracted profiles agree with gold ones: `python -m eeyore.data.agreement PREDICTED GOLD`.

Profiles are joined by conversation (its `conversation_id`, else `id`, else `source` +
`id_source`, else its position). Per field:
  - severities (each symptom, pooled over the 18; depression, suicidal and homicidal ideation,
    resistance): exact match and within one level, on the field's own scale;
  - presence of each symptom (any severity) and each cognitive distortion: F1 (pooled), with
    precision and recall;
  - demographic fields: accuracy of the normalised value (case, spacing, a final full stop, and
    every way of saying "unknown" are ignored).
A gold value that reads as no level of its scale is left out of that field's count; a predicted
one counts as a miss. Writes a Markdown table and a PNG chart.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eeyore.profile import (
    DEMOGRAPHIC_FIELDS, DISTORTION_LEVELS, DISTORTION_NAMES, DISTORTIONS, LEVEL_SCALES, SYMPTOM_LEVELS, SYMPTOM_NAMES,
    SYMPTOMS, known_value, read_level,
)
from eeyore.train.data import DataError

from .conversations import load_profile_records, write_atomic


@dataclass
class Row:
    field: str
    metric: str  # "exact" / "within one" / "F1" / "accuracy"
    value: float | None  # None when no pair could be scored
    n: int
    note: str = ""  # precision / recall of an F1


def _fields(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: r["profile"] for k, r in records.items()}


def _level(value: Any, levels: tuple[str, ...]) -> int | None:
    read = read_level(value, levels)
    return None if read is None else read[0]


def _severity(pairs: list[tuple[Any, Any]], levels: tuple[str, ...], name: str) -> list[Row]:
    levelled = [(_level(p, levels), _level(g, levels)) for p, g in pairs]
    scored = [(p, g) for p, g in levelled if g is not None]
    exact = sum(p == g for p, g in scored)
    near = sum(p is not None and abs(p - g) <= 1 for p, g in scored)
    n = len(scored)
    return [Row(name, "exact", exact / n if n else None, n), Row(name, "within one", near / n if n else None, n)]


def _f1(pairs: list[tuple[bool, bool]], name: str) -> Row:
    if not pairs:
        return Row(name, "F1", None, 0)
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    fn = sum(g and not p for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Row(name, "F1", f1, len(pairs), f"P {precision:.2f} R {recall:.2f}")


def _normalise(value: Any) -> str:
    text = " ".join(str(value).split()).strip().rstrip(".").lower()
    return known_value(text) or "unknown"


def agreement(predicted: dict[str, dict], gold: dict[str, dict]) -> tuple[list[Row], int]:
    """The table's rows over the conversations both sides have, and how many gold ones lack a prediction."""
    both = [(predicted[k], gold[k]) for k in gold if k in predicted]
    rows: list[Row] = []
    symptom_pairs = [(p[SYMPTOMS][s], g[SYMPTOMS][s]) for p, g in both for s in SYMPTOM_NAMES]
    rows += _severity(symptom_pairs, SYMPTOM_LEVELS, f"{SYMPTOMS} (18, pooled)")
    for name, levels in LEVEL_SCALES.items():
        rows += _severity([(p[name], g[name]) for p, g in both], levels, name)
    rows.append(_f1([(_level(p, SYMPTOM_LEVELS) not in (0, None), _level(g, SYMPTOM_LEVELS) not in (0, None))
                     for p, g in symptom_pairs], "symptom presence"))
    rows.append(_f1([(_level(p[DISTORTIONS][d], DISTORTION_LEVELS) == 1, _level(g[DISTORTIONS][d], DISTORTION_LEVELS) == 1)
                     for p, g in both for d in DISTORTION_NAMES], "distortion presence"))
    for name in DEMOGRAPHIC_FIELDS:
        hits = [_normalise(p[name]) == _normalise(g[name]) for p, g in both]
        rows.append(Row(name, "accuracy", sum(hits) / len(hits) if hits else None, len(hits)))
    return rows, len(gold) - len(both)


def markdown(rows: list[Row], matched: int, missing: int, extra: int) -> str:
    lines = [
        f"Profiles compared: {matched} (gold without a prediction: {missing}; predictions without gold: {extra}).",
        "",
        "| field | metric | agreement | n | note |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        lines.append(f"| {r.field} | {r.metric} | {value} | {r.n} | {r.note} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.value is not None]
    labels = [f"{r.field} — {r.metric}" for r in scored]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(scored) + 1.2))
    ax.barh(range(len(scored)), [r.value for r in scored], color="#4c72b0")
    ax.set_yticks(range(len(scored)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("agreement with gold")
    ax.set_title("Extracted profiles against gold")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eeyore.data.agreement",
        description="Per-field agreement of predicted (extracted) profiles with gold profiles, as a Markdown "
        "table and a PNG chart.",
    )
    p.add_argument("predicted", help="predicted profiles: extract_profiles output (.jsonl) or a profiles .json/.parquet")
    p.add_argument("gold", help="gold profiles, e.g. the shared test profiles (.json list or .jsonl)")
    p.add_argument("--markdown", type=Path, default=None, help="where to write the table (default: PREDICTED's name + .agreement.md)")
    p.add_argument("--chart", type=Path, default=None, help="where to write the chart (default: PREDICTED's name + .agreement.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stem = Path(args.predicted).with_suffix("")
    md_path = args.markdown or stem.with_name(stem.name + ".agreement.md")
    png_path = args.chart or stem.with_name(stem.name + ".agreement.png")
    try:
        predicted, gold = (_fields(load_profile_records(path)) for path in (args.predicted, args.gold))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, missing = agreement(predicted, gold)
    text = markdown(rows, len(gold) - missing, missing, len(set(predicted) - set(gold)))
    write_atomic(md_path, text)
    chart(rows, png_path)
    print(text + f"\ntable: {md_path}\nchart: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
