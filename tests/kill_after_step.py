"""Run a training command line and SIGKILL the process right after optimizer step N: a crash.

    python tests/kill_after_step.py N eeyore.train.sft ARGS...     (under torchrun alike)

The kill is a `trainer.STEP_END_CALLBACKS` entry, so the training loop knows nothing of tests.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's eeyore

from eeyore.train import trainer  # noqa: E402


def main() -> None:
    at, module = int(sys.argv[1]), sys.argv[2]

    def kill(t: trainer.Trainer) -> None:
        if t.step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.STEP_END_CALLBACKS.append(kill)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
