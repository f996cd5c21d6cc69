"""Screenshots of the studio's pages for docs/studio/, taken with Debian's chromium.

    python scripts/studio_screenshots.py            # the embedded model; writes docs/studio/*.png

Starts `python -m eeyore.studio` on a scratch data directory with an annotation queue cut from
the sample profiles' conversations (the real client reply against a generic helper-style one),
has a short practice session with the model, labels the first item as two annotators and opens
a profile with one invalid value, taking a picture of each page. Rerun it when a page changes
(`--pages` retakes some of them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the studio exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/practice/profiles") as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"error: the studio at {url} was not ready after {seconds:.0f} s")


def practice(page, url: str, out: Path) -> None:
    page.goto(url + "/practice")
    page.wait_for_selector("body[data-ready='1']")
    page.get_by_test_id("profile-select").select_option("1")
    page.locator("#max_tokens").fill("48")
    page.get_by_test_id("start-session").click()
    for turn, text in enumerate(["Hi, thanks for coming in. What's been on your mind lately?",
                                 "That sounds exhausting. When did you last feel rested?"], 1):
        page.get_by_test_id("message-input").fill(text)
        page.get_by_test_id("send").click()
        expect(page.get_by_test_id("client-turn")).to_have_count(turn, timeout=1_200_000)
        expect(page.locator("[aria-busy]")).to_have_count(0, timeout=1_200_000)
    page.screenshot(path=out / "practice.png", full_page=True)


GENERIC = "I'm sorry to hear that. Here are a few tips that might help: 1) keep a regular sleep schedule, 2) reach out to friends."


def pairs_file(path: Path) -> Path:
    """Items from the sample conversations: the prompt up to a client reply, that reply vs GENERIC."""
    from eeyore.profile import load_profiles, render_system_prompt

    rows = []
    for p in load_profiles(None):
        conv = [m for m in p.record.get("conversation") or [] if m["role"] != "system"]
        turn = next((j for j, m in enumerate(conv) if m["role"] == "assistant" and j >= 3), None)
        if turn is not None:
            prompt = [{"role": "system", "content": render_system_prompt(p.record)}, *conv[:turn]]
            rows.append({"prompt": prompt, "candidates": [conv[turn]["content"], GENERIC]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def annotate(browser, url: str, tokens: dict[str, str], out: Path) -> None:
    for i, (name, key) in enumerate([("alice", "choose-a"), ("bob", "choose-b")]):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/annotate")
        page.locator("#signin-name").fill(name)
        page.locator("#signin-token").fill(tokens[name])
        page.locator("#signin-submit").click()
        page.wait_for_selector("body[data-ready='1']")
        if i == 0:
            page.get_by_test_id("rationale").fill("Reply 1 stays vague and tired, like the profile.")
            page.screenshot(path=out / "annotate.png", full_page=True)
        page.get_by_test_id(key).click()  # the keys work too, but not while the rationale has the focus
        expect(page.get_by_test_id("progress")).to_contain_text("1 of")
    page.goto(url + "/annotate/summary")
    page.wait_for_selector("body[data-ready='1']")
    page.screenshot(path=out / "summary.png", full_page=True)


def profiles(browser, url: str, tokens: dict[str, str], out: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/profiles")
    page.locator("#signin-name").fill("alice")
    page.locator("#signin-token").fill(tokens["alice"])
    page.locator("#signin-submit").click()
    page.wait_for_selector("body[data-ready='1']")
    page.locator("[data-testid^='profile-field-symptom severity/']").first.fill("Very bad")
    page.get_by_test_id("accept-profile").click()
    page.get_by_test_id("validation-error").wait_for(state="visible")
    page.locator("header").scroll_into_view_if_needed()
    page.screenshot(path=out / "profiles.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint for the replies (default: the embedded model)")
    p.add_argument("--out", default=str(REPO / "docs" / "studio"), help="where the PNGs go (default docs/studio)")
    p.add_argument("--pages", default="practice,annotate,profiles", help="the pages to photograph; annotate "
                   "includes the agreement summary (default practice,annotate,profiles)")
    args = p.parse_args()
    exe = shutil.which("chromium")
    if exe is None:
        sys.exit("error: no chromium on PATH (apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "eeyore.studio", "--data-dir", str(data), "--port", str(port), "--annotators", "alice,bob",
           "--pairs", str(pairs_file(data / "pairs.jsonl"))]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_ready(url, proc)
        tokens = json.loads((data / "annotators.json").read_text())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
            pages = set(args.pages.split(","))
            if "practice" in pages:
                practice(browser.new_page(viewport={"width": 1280, "height": 900}), url, out)
            if "annotate" in pages:
                annotate(browser, url, tokens, out)
            if "profiles" in pages:
                profiles(browser, url, tokens, out)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    print(f"screenshots in {out}: {', '.join(sorted(p.name for p in out.glob('*.png')))}")


if __name__ == "__main__":
    main()
