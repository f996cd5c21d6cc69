"""`python -m eeyore.demo`: the whole Eeyore method on one CPU machine, with the embedded model.

Profiles are extracted from real conversations, SFT records built from them, the model is
fine-tuned, round-1 preference pairs are generated and one DPO round trained; then the base, SFT
and DPO models are evaluated side by side and a report is written. Every stage is the project's
own command line (printed as it runs), so the demo doubles as a worked example of each command.

An interrupted demo resumes at the stage it stopped in: each finished stage leaves a marker in
OUT/.stages/, and the training stages resume from their own checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from eeyore.demo.servers import StageError
from eeyore.demo.stages import FAST, FULL, STAGES, Demo
from eeyore.demo.summary import summary
from eeyore.profile import sample_profiles_path

SAMPLE_PROFILES = sample_profiles_path()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eeyore.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("eeyore-demo"),
                   help="folder for every artifact: data, checkpoints, evaluations, report (default: ./eeyore-demo)")
    p.add_argument("--profiles", type=Path, default=SAMPLE_PROFILES,
                   help="profiles with their real conversations, in the evaluator's profile format "
                        "(default: the sample profiles shipped with eeyore)")
    p.add_argument("--model", default=None,
                   help="the model the method starts from: a checkpoint folder or cached hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--fast", action="store_true",
                   help="a few steps per stage (about 5 minutes on 2 cores) instead of the full demo (about 20)")
    p.add_argument("--restart", action="store_true", help="forget finished stages and run every stage again")
    return p.parse_args(argv)


def _base_model(name: str | None) -> Path:
    from eeyore.model.pretrained import resolve_model_dir
    return Path(resolve_model_dir(name))  # None: the embedded default model, converted on first use


def run_stages(demo: Demo, restart: bool) -> dict[str, float]:
    """Run every stage not yet finished; return the wall time of each stage (this run's or a past one's)."""
    marks = demo.path(".stages")
    marks.mkdir(parents=True, exist_ok=True)
    timings_file = demo.path("timings.json")
    timings = {} if restart or not timings_file.exists() else json.loads(timings_file.read_text())
    for i, (name, title, stage) in enumerate(STAGES, 1):
        mark = marks / f"{name}.done"
        if restart:
            mark.unlink(missing_ok=True)
        if mark.exists():
            print(f"[{i}/{len(STAGES)}] {title}: done in an earlier run, skipped", flush=True)
            continue
        print(f"\n[{i}/{len(STAGES)}] {title}", flush=True)
        start = time.monotonic()
        stage(demo)
        timings[name] = round(time.monotonic() - start, 1)
        print(f"  finished in {timings[name]:.0f} s", flush=True)
        timings_file.write_text(json.dumps(timings, indent=1))
        mark.touch()
    return timings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.profiles.is_file():
        print(f"error: --profiles {args.profiles}: no such file", file=sys.stderr)
        return 2
    try:
        demo = Demo(out=args.out.resolve(), base=_base_model(args.model), profiles=args.profiles.resolve(),
                    settings=FAST if args.fast else FULL)
        timings = run_stages(demo, args.restart)
    except (StageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("rerun the same command to resume at this stage", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume at this stage", file=sys.stderr)
        return 130
    print(summary(demo, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
