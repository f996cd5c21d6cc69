"""The commands in the docs cannot rot: every `python -m eeyore...` (or torchrun / deepspeed) line in a
fenced shell block of README.md and docs/ names a module that exists and only flags its `--help`
lists; blocks placed right after a `<!-- runnable on CPU -->` line are run, and must succeed."""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [p for p in (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))) if p.is_file()]
RUNNABLE = "<!-- runnable on CPU -->"
FENCE = re.compile(r"^```(bash|sh|shell|console)?\s*$")


def shell_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, runnable) of every fenced shell block of a Markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            runnable = i > 0 and lines[i - 1].strip() == RUNNABLE
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((i - len(body), "\n".join(body), runnable))
        i += 1
    return blocks


def commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists: continuations joined, `&&`, `;` and `&` split."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|;|\|\|)\s*|\s+&\s*$|\s+&\s+", line):
            if part.strip():
                out.append(shlex.split(part))
    return out


def project_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for a command that runs one of the project's modules."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    for flag in ("-m", "--module"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 < len(argv) and argv[i + 1].startswith(("eeyore", "kernels")):
                return argv[i + 1], argv[i + 2:]
    return None


@functools.lru_cache(maxsize=None)
def help_text(module: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, f"`python -m {module} --help` failed: {proc.stderr[-1500:]}"
    # runpy's "found in sys.modules after import of package" warning: the package's __init__
    # imports the module it is asked to run, so its top level ran twice
    assert "RuntimeWarning" not in proc.stderr, f"`python -m {module} --help` warns: {proc.stderr[-1500:]}"
    return proc.stdout


def _cases():
    for path in DOCS:
        for line, block, runnable in shell_blocks(path):
            yield pytest.param(path, line, block, runnable, id=f"{path.relative_to(ROOT)}:{line}")


CASES = list(_cases())


def test_the_docs_have_commands_to_check():
    if not (ROOT / "README.md").is_file():
        pytest.skip("the tests were copied without the repository's docs")
    modules = {project_module(a)[0] for _, _, b, _ in (c.values for c in CASES) for a in commands(b) if project_module(a)}
    assert {"eeyore.serve", "eeyore.train.sft", "eeyore.train.dpo", "eeyore.eval", "eeyore.demo"} <= modules


def test_the_parser_finds_modules_and_flags():
    block = 'VAR=1 torchrun --nproc_per_node=8 -m eeyore.train.sft \\\n  --bf16 --max_len 4096 &\npython x.py'
    argv = commands(block)
    assert project_module(argv[0]) == ("eeyore.train.sft", ["--bf16", "--max_len", "4096"])
    assert project_module(argv[1]) is None


DOCUMENTED_MODULES = sorted({found[0] for c in CASES for argv in commands(c.values[2]) if (found := project_module(argv))})


@pytest.mark.parametrize("module", DOCUMENTED_MODULES)
def test_documented_module_runs_without_warnings(module):
    help_text(module)


@pytest.mark.parametrize("path,line,block,runnable", CASES)
def test_doc_block(path, line, block, runnable):
    for argv in commands(block):
        found = project_module(argv)
        if found is None:
            continue
        module, args = found
        text = help_text(module)
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        unknown = sorted(f for f in flags if not re.search(re.escape(f) + r"\b", text))
        assert not unknown, f"{path.name}:{line}: `python -m {module}` has no {unknown}"
    if runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
        assert proc.returncode == 0, f"{path.name}:{line} failed:\n{proc.stderr[-2000:]}"
