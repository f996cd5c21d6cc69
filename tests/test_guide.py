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
    for name in ("loss_mask.png", "rope_scaling.png", "eot_probability.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 10_000
        assert (GUIDE / "figures" / name).is_file(), f"{name} is not committed"


def test_committed_figures_are_non_empty_pngs():
    for name in ("loss_mask.png", "rope_scaling.png", "eot_probability.png", "timeline.png"):
        data = (GUIDE / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{name} is not a drawn PNG"


# The schedule continuous-batching.md walks through, worked out by hand from the scheduler's rules
# (3 slots, 32 prefill tokens per step; the prompt's last token is left to the decode step):
# (step, slot, request, phase, tokens computed)
HAND_CHECKED = [
    (1, 0, "A", "prefill", 19), (1, 1, "B", "prefill", 11),  # both fit the budget: 30 of 32
    (1, 0, "A", "decode", 1), (1, 1, "B", "decode", 1),
    (2, 0, "A", "decode", 1), (2, 1, "B", "decode", 1),
    (3, 2, "C", "prefill", 32),  # 69 to compute: the whole budget
    (3, 0, "A", "decode", 1), (3, 1, "B", "decode", 1),  # B's 3rd token: done; C moves down to slot 1
    (4, 1, "C", "prefill", 32),  # D took slot 2, E waits; C, first come, takes the whole budget
    (4, 0, "A", "decode", 1),
    (5, 1, "C", "prefill", 5), (5, 2, "D", "prefill", 7),
    (5, 0, "A", "decode", 1), (5, 1, "C", "decode", 1), (5, 2, "D", "decode", 1),
    (6, 0, "A", "decode", 1), (6, 1, "C", "decode", 1), (6, 2, "D", "decode", 1),  # A's 6th: D moves to 0
    (7, 2, "E", "prefill", 15),
    (7, 0, "D", "decode", 1), (7, 1, "C", "decode", 1), (7, 2, "E", "decode", 1),
    (8, 0, "D", "decode", 1), (8, 1, "C", "decode", 1), (8, 2, "E", "decode", 1),  # C's 4th, E's 2nd
    (9, 0, "D", "decode", 1),
]


def test_traced_run_follows_the_hand_checked_schedule(tiny_ckpt):
    """The engine's trace of the guide's scenario, on a tiny model: the schedule depends only on
    the lengths, so this is the run the timeline figure shows."""
    sys.path.insert(0, str(GUIDE))
    from batching_timeline import SCENARIO, prompts_from, run_traced, traced_engine

    from eeyore.model import Llama, Tokenizer

    tok = Tokenizer.from_pretrained(tiny_ckpt)
    engine = traced_engine(Llama.from_pretrained(tiny_ckpt), tok)
    ids = list(range(1, 1 + sum(a.prompt_tokens for a in SCENARIO)))  # distinct: no prefix to reuse
    assert run_traced(engine, prompts_from(ids)) == HAND_CHECKED
    assert engine.trace is None and not engine.live
