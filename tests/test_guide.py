"""docs/guide stays true to the code: every link reaches a file that exists and names a function
or class defined there, and the figure script runs on CPU and agrees with the committed page."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def links():
    for page in sorted(GUIDE.glob("*.md")):
        for text, target in LINK.findall(page.read_text()):
            if not re.match(r"[a-z]+:", target):
                yield page, text, target


def defines(source: str, name: str) -> bool:
    return bool(re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]", source, re.M))


def test_guide_pages_exist():
    assert {p.name for p in GUIDE.glob("*.md")} >= {"README.md", "chat-template-and-loss-mask.md",
                                                     "llama-forward-and-rope.md", "sampler.md", "evaluation.md"}


@pytest.mark.parametrize("page,text,target", list(links()), ids=lambda v: v.name if isinstance(v, Path) else str(v)[:40])
def test_link_points_at_existing_code(page, text, target):
    path = (page.parent / target.split("#")[0]).resolve()
    assert path.exists(), f"{page.name}: [{text}]({target}) points at nothing"
    name = re.fullmatch(r"`([A-Za-z_][\w.]*)(?:\(\))?`", text)
    if name and path.suffix == ".py" and name.group(1) not in (path.name, path.stem):
        for part in name.group(1).split("."):
            assert defines(path.read_text(), part), f"{page.name}: {part} is not defined in {target}"


def test_figures_are_made_from_the_code(smollm2_dir, tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(GUIDE / "make_figures.py"), "--check", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("loss_mask.png", "rope_scaling.png", "eot_probability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 10_000
        assert (GUIDE / "figures" / name).is_file(), f"{name} is not committed"
