"""A real run of the serving engine, traced: which request holds which KV-cache slot at each step.

    python docs/guide/batching_timeline.py      # prints the trace of SCENARIO on the embedded model

Five requests with different prompt lengths and reply budgets arrive at different steps of an
engine with 3 slots and a prefill budget of 32 tokens per step. The engine's opt-in `trace` hook
(`eeyore.serve.engine.Engine.trace`) records every row of every forward; `make_figures.py` draws
the trace as timeline.png, and tests/test_guide.py checks it against the schedule worked out by
hand in continuous-batching.md. The schedule depends only on the lengths, so any model gives
the same trace: replies are greedy and ignore end of turn, so each runs to its `max_tokens`.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

GUIDE = Path(__file__).resolve().parent
sys.path.insert(0, str(GUIDE.parents[1]))  # run from a checkout without installing

from eeyore.serve.engine import Engine  # noqa: E402
from eeyore.serve.params import SamplingParams  # noqa: E402
from eeyore.serve.request import Output, TraceRow  # noqa: E402

SLOTS, PREFILL_CHUNK = 3, 32


@dataclass(frozen=True)
class Arrival:
    name: str
    step: int  # the step loop iteration whose admission first sees the request
    prompt_tokens: int
    max_tokens: int


SCENARIO = (
    Arrival("A", 1, 20, 6),
    Arrival("B", 1, 12, 3),
    Arrival("C", 3, 70, 4),  # longer than the prefill budget: prefilled over three steps
    Arrival("D", 4, 8, 5),
    Arrival("E", 4, 16, 2),  # no slot free when it arrives: it waits
)

Row = tuple[int, int, str, str, int]  # (step, slot, request name, "prefill" | "decode", tokens)


def prompts_from(ids: list[int]) -> dict[str, list[int]]:
    """Each request's prompt: consecutive, non-overlapping pieces of `ids`, so no two prompts
    share a prefix the scheduler would reuse."""
    out, at = {}, 0
    for a in SCENARIO:
        out[a.name] = ids[at: at + a.prompt_tokens]
        at += a.prompt_tokens
    if at > len(ids):
        raise ValueError(f"the scenario needs {at} prompt tokens, got {len(ids)}")
    return out


def traced_engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer, max_batch_size=SLOTS, prefill_chunk=PREFILL_CHUNK, max_model_len=256)


def run_traced(engine: Engine, prompts: dict[str, list[int]], timeout_s: float = 300.0) -> list[Row]:
    """Run SCENARIO on a fresh `engine`; the trace as (step, slot, name, phase, tokens) rows.

    A request due at step k is submitted while step k - 1 runs (from the trace hook, on the
    worker thread), so the admission at the start of step k sees it: the arrivals are pinned to
    steps, not to the clock, and the run is the same on every machine."""
    rows: list[TraceRow] = []
    names: dict[int, str] = {}
    finished = threading.Semaphore(0)
    due = {a.step: [] for a in SCENARIO}
    for a in SCENARIO:
        due[a.step].append(a)

    def sink(out: Output) -> None:
        if out.finish_reason is not None:
            finished.release()

    def submit(step: int) -> None:
        for a in due.pop(step, []):
            params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
            names[engine.submit(prompts[a.name], params, sink).id] = a.name

    def trace(row: TraceRow) -> None:
        rows.append(row)
        submit(row.step + 1)

    engine.trace = trace
    with engine:
        with engine.scheduler.lock:  # the first step's requests are admitted together
            submit(1)
        for _ in SCENARIO:
            if not finished.acquire(timeout=timeout_s):
                raise RuntimeError(f"the traced run stalled; requests still due at steps {sorted(due)}")
    engine.trace = None
    return [(r.step, r.slot, names[r.request], r.phase, r.tokens) for r in rows]


def embedded_trace() -> list[Row]:
    """The trace on the embedded model, its prompts cut from the sample conversations."""
    import torch

    from eeyore.model import Llama, Tokenizer
    from eeyore.model.pretrained import resolve_model_dir
    from eeyore.profile import load_profiles

    path = resolve_model_dir(None)
    tok = Tokenizer.from_pretrained(path)
    text = " ".join(t for p in load_profiles(None) for t in p.client_turns())
    engine = traced_engine(Llama.from_pretrained(path, torch.float32), tok)
    return run_traced(engine, prompts_from(tok.encode(text)))


def plot_timeline(rows: list[Row], path: Path) -> None:
    """One lane per slot, one column per step: a request's colour where it holds the slot,
    hatched while its prompt is prefilled (with the number of prompt tokens computed)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = [a.name for a in SCENARIO]
    colours = dict(zip(names, plt.get_cmap("tab10").colors))
    last = max(r[0] for r in rows)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for step, slot, name, phase, tokens in rows:
        x = step - 0.5 + (0.0 if phase == "prefill" else 0.5)  # each step: prefill half, then decode half
        ax.add_patch(Rectangle((x, slot - 0.4), 0.5, 0.8, facecolor=colours[name], edgecolor="white",
                               hatch="///" if phase == "prefill" else None, alpha=0.55 if phase == "prefill" else 1.0))
        ax.text(x + 0.25, slot, name if phase == "decode" else f"{name}\n{tokens}", ha="center", va="center",
                fontsize=7 if phase == "prefill" else 9, weight="bold")
    arrivals: dict[int, list[str]] = {}
    for a in SCENARIO:
        arrivals.setdefault(a.step, []).append(f"{a.name}: {a.prompt_tokens} + {a.max_tokens}")
    for step, lines in arrivals.items():
        ax.text(step - 0.45, -0.6, "arrive\n" + "\n".join(lines), fontsize=7, va="bottom", ha="left")
        ax.axvline(step - 0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0.4, last + 0.6)
    ax.set_ylim(SLOTS - 0.5, -1.8)
    ax.set_xticks(range(1, last + 1))
    ax.set_yticks(range(SLOTS), [f"slot {i}" for i in range(SLOTS)])
    ax.set_xlabel("engine step: prefill forward (hatched, prompt tokens computed), then one decode forward "
                  "(solid, one token each)", fontsize=8)
    ax.set_title(f"A real run: {SLOTS} slots, {PREFILL_CHUNK} prefill tokens per step "
                 "(arrivals: prompt tokens + max_tokens)", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    for row in embedded_trace():
        print(*row)
