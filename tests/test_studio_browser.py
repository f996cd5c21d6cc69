"""The studio's pages in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Replies come from a scripted OpenAI-compatible endpoint, so every test knows what the client
says. Skipped without Playwright or Chromium, except under EEYORE_REQUIRE_BROWSER=1 (CI).
"""
from __future__ import annotations

import json
import math
import re
import time

import pytest

from playwright.sync_api import expect

from eeyore.studio.schema import load_records, system_prompt
from eeyore.studio.store import read_jsonl
from studio_fixtures import Served, chromium_or_skip, start_studio

XSS = "<img src=x onerror=alert(1)>"
TIMEOUT = 30_000


@pytest.fixture(scope="module")
def browser():
    pw, browser = chromium_or_skip()
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def open_page(browser, url: str, dialogs: list | None = None, ready: bool = True):
    page = browser.new_context(accept_downloads=True).new_page()
    page.set_default_timeout(TIMEOUT)
    if dialogs is not None:
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']" if ready else "#signin")
    return page


def until(check, seconds: float = TIMEOUT / 1000) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def send(page, text: str, turns: int) -> str:
    page.get_by_test_id("message-input").fill(text)
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("client-turn")).to_have_count(turns)
    expect(page.locator("[aria-busy]")).to_have_count(0)
    return page.get_by_test_id("client-turn").nth(turns - 1).locator(".text").text_content()


def test_practice_session_two_turns_saved_and_downloaded(browser, served, tmp_path):
    replies = ["I don't know. I just feel tired all the time.", "Work, mostly. And nights are the worst."]
    url, fake = start_studio(served, tmp_path / "data", replies=replies)
    page = open_page(browser, url + "/practice")
    page.get_by_test_id("profile-select").select_option("1")
    record = load_records(None)[1]
    prompt = page.locator("#system-prompt")
    until(lambda: prompt.text_content() == system_prompt(record))  # exactly as in training
    assert page.locator("#temperature").input_value() == "1" and page.locator("#top_p").input_value() == "0.8"
    page.locator("#top_p").fill("0.7")  # settings are editable, and the session keeps them
    page.get_by_test_id("start-session").click()
    page.wait_for_selector("[data-testid=message-input]:not([disabled])")
    assert send(page, "Hi, what brings you here today?", 1) == replies[0]
    assert send(page, "What feels hardest right now?", 2) == replies[1]
    assert page.get_by_test_id("counsellor-turn").count() == 2
    page.get_by_test_id("end-session").click()
    expect(page.locator("#session-state")).to_contain_text("ended")
    with page.expect_download() as info:
        page.get_by_test_id("download-transcript").click()
    downloaded = json.loads(open(info.value.path(), encoding="utf-8").read())
    [saved] = [json.loads(p.read_text()) for p in (tmp_path / "data/practice").glob("*.json")]
    assert downloaded == saved and saved["ended"] is not None
    assert [(m["role"], m["content"]) for m in saved["messages"]] == [
        ("system", system_prompt(record)), ("user", "Hi, what brings you here today?"), ("assistant", replies[0]),
        ("user", "What feels hardest right now?"), ("assistant", replies[1])]
    assert saved["settings"]["top_p"] == 0.7 and fake.requests[1]["top_p"] == 0.7
    assert fake.requests[1]["messages"][-1]["content"] == "What feels hardest right now?"


def test_model_reply_with_markup_is_shown_as_text(browser, served, tmp_path):
    url, _ = start_studio(served, tmp_path / "data", replies=[XSS])
    dialogs: list[str] = []
    page = open_page(browser, url + "/practice", dialogs)
    page.get_by_test_id("start-session").click()
    page.wait_for_selector("[data-testid=message-input]:not([disabled])")
    assert send(page, XSS, 1) == XSS  # the trainee's text too
    page.wait_for_timeout(300)  # time for an onerror handler to fire, were there an image
    assert dialogs == []
    assert page.locator("#turns img").count() == 0
    assert page.get_by_test_id("counsellor-turn").locator(".text").text_content() == XSS


def pairs_file(path, n: int = 5):
    rows = [{"prompt": [{"role": "system", "content": "You are a client."}, {"role": "user", "content": f"How was day {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Long, day {i}. I barely slept."}],
             "rejected": [{"role": "assistant", "content": f"Great! Day {i} was perfect."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sign_in(page, name: str, token: str) -> None:
    page.locator("#signin-name").fill(name)
    page.locator("#signin-token").fill(token)
    page.locator("#signin-submit").click()
    page.wait_for_selector("body[data-ready='1']")


def annotate(page, keys: list[str], shown: list[tuple[str, str, str]]) -> None:
    """Label items with `keys` (1, 2, 0, s: keyboard; click:a etc.: buttons), noting what was shown."""
    for key in keys:
        before = page.get_by_test_id("progress").text_content()
        a, b = page.get_by_test_id("candidate-a").text_content(), page.get_by_test_id("candidate-b").text_content()
        shown.append((key, a, b))
        if key.startswith("click:"):
            page.get_by_test_id({"a": "choose-a", "b": "choose-b", "tie": "tie"}[key[6:]]).click()
        else:
            page.keyboard.press(key)
        expect(page.get_by_test_id("progress")).not_to_have_text(before)


def test_ten_annotations_by_two_annotators_with_a_reload_then_one_dpo_step(browser, served, tmp_path, tiny_ckpt):
    data = tmp_path / "data"
    url, _ = start_studio(served, data, "--pairs", str(pairs_file(tmp_path / "pairs.jsonl")), "--annotators", "alice,bob",
                          replies=["unused"])
    tokens = json.loads((data / "annotators.json").read_text())
    alice = open_page(browser, url + "/annotate", ready=False)
    sign_in(alice, "alice", tokens["alice"])
    shown: list = []
    alice.get_by_test_id("rationale").fill("the other one sounds like a chatbot")
    annotate(alice, ["click:a", "2"], shown)
    alice.reload()  # resumes where she was: the session cookie keeps her signed in
    alice.wait_for_selector("body[data-ready='1']")
    assert alice.get_by_test_id("progress").text_content() == "2 of 5 labelled"
    annotate(alice, ["1", "0", "2"], shown)
    bob = open_page(browser, url + "/annotate", ready=False)
    sign_in(bob, "bob", tokens["bob"])
    annotate(bob, ["1", "s", "2", "click:b", "1"], shown)
    assert bob.get_by_test_id("progress").text_content() == "5 of 5 labelled"

    records = read_jsonl(data / "annotate/round2_dpo.jsonl")
    assert len(records) == 8 and len(read_jsonl(data / "annotate/other_labels.jsonl")) == 2  # 1 tie, 1 skip
    assert records[0]["annotator"] == "alice" and records[0]["rationale"] == "the other one sounds like a chatbot"
    picks = [(a if k in ("1", "click:a") else b) for k, a, b in shown if k in ("1", "2", "click:a", "click:b")]
    assert [r["chosen"][0]["content"] for r in records] == picks  # the reply on the side they picked
    for r in records:
        assert {r["chosen"][0]["content"], r["rejected"][0]["content"]} <= {c for _, a, b in shown for c in (a, b)}
        assert r["prompt"][-1]["role"] == "user" and set(r["flags"]) == {"chosen", "rejected"}

    summary = bob
    summary.goto(url + "/annotate/summary")  # annotators only: bob's session is signed in
    summary.wait_for_selector("body[data-ready='1']")
    row = summary.get_by_test_id("kappa-row").first.locator("td")
    assert row.nth(0).text_content() == "alice · bob" and row.nth(1).text_content() == "4"

    from eeyore.train.dpo import main
    out = tmp_path / "dpo"
    main(["--pretrain", str(tiny_ckpt), "--dataset", str(data / "annotate/round2_dpo.jsonl"), "--apply_chat_template",
          "--prompt_key", "prompt", "--max_len", "256", "--save_path", str(out), "--ckpt_path", str(out / "ckpts"),
          "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_samples", "4", "--max_epochs", "1",
          "--learning_rate", "1e-3"])
    [step] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step
    assert (out / "model.safetensors").is_file() or any(out.glob("*.safetensors"))


def test_profile_edit_invalid_value_rejected_valid_value_saved(browser, served, tmp_path):
    data = tmp_path / "data"
    url, _ = start_studio(served, data, replies=["unused"])
    page = open_page(browser, url + "/profiles")
    record = load_records(None)[0]
    symptom = next(iter(record["profile"]["symptom severity"]))
    field = page.get_by_test_id(f"profile-field-symptom severity/{symptom}")
    field.fill("Very bad")
    page.get_by_test_id("accept-profile").click()
    error = page.get_by_test_id("validation-error")
    error.wait_for(state="visible")
    assert symptom in error.text_content() and "Very bad" in error.text_content()
    assert field.get_attribute("aria-invalid") == "true"  # the broken field is marked
    assert page.get_by_test_id("profile-field-occupation").get_attribute("aria-invalid") is None
    assert read_jsonl(data / "profiles/versions.jsonl") == []  # nothing saved
    field.fill("Severe")
    page.get_by_test_id("profile-field-occupation").fill("Retired nurse")
    page.get_by_test_id("accept-profile").click()
    expect(page.locator("#status")).to_have_text(re.compile("^accepted"))
    assert error.is_hidden() and field.get_attribute("aria-invalid") is None
    [version] = read_jsonl(data / "profiles/versions.jsonl")
    assert (version["decision"], version["by"], version["version"]) == ("accepted", "local", 1)
    assert version["record"]["profile"]["symptom severity"][symptom] == "Severe"
    assert version["record"]["profile"]["occupation"] == "Retired nurse"
    with page.expect_download() as info:
        page.locator("#export").click()
    exported = tmp_path / "accepted.json"
    exported.write_bytes(open(info.value.path(), "rb").read())
    assert load_records(str(exported)) == [version["record"]]  # the evaluator's profile format
