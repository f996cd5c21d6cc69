"""The demo's building blocks: run one of the project's commands, and serve a model for a while.

Every stage of the demo is one or more of the commands a user would type (`python -m
eeyore.train.sft ...`), run as a child process, so the demo teaches the command lines as it goes
and a stage that fails shows the same message the command would.
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# The reference's sampling flags for its simulated client (temperature 1, nucleus 0.8, a -4 bias on
# end-of-turn, and a length penalty that lifts end-of-turn gently as a reply grows).
REFERENCE_SAMPLING = ["--temperature", "1.0", "--top-p", "0.8",
                      "--exponential-decay-length-penalty", "0", "1.01"]


class StageError(RuntimeError):
    """A command of the demo failed; the message is one line a user can act on."""


def show(argv: list[str]) -> str:
    """The command as a user would type it (with `python` for the interpreter)."""
    shown = ["python" if a == sys.executable else a for a in argv]
    return shlex.join(shown)


def run(argv: list[str]) -> None:
    """Run one command, its output passed through (progress bars included); raise on failure."""
    print(f"  $ {show(argv)}", flush=True)
    code = subprocess.call(argv)
    if code != 0:
        raise StageError(f"`{show(argv)}` exited with status {code}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(model: str | Path, name: str, log: Path, extra: list[str] | None = None, timeout: float = 300):
    """Run `python -m eeyore.serve` on a free local port; yield its base URL; stop it on exit."""
    port = free_port()
    argv = [sys.executable, "-m", "eeyore.serve", "--model", str(model), "--served-model-name", name,
            "--port", str(port), *REFERENCE_SAMPLING, *(extra or [])]
    print(f"  $ {show(argv)} &", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if proc.poll() is not None:
                raise StageError(f"the server for {name} exited with status {proc.returncode} (its output: {log})")
            if time.monotonic() > deadline:
                raise StageError(f"the server for {name} did not answer within {timeout:.0f} s (its output: {log})")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
