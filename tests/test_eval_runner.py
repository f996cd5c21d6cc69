"""A whole evaluation against a scripted endpoint: aggregation, missing scores, the cache and
resuming, the baselines' prompts, the CLI and the report."""
import asyncio
import json

import pytest
from eval_fakes import FakeEndpoint

from eeyore.profile import ProfileError, load_profiles, traits
from eeyore.eval.__main__ import main as cli_main, parse_args
from eeyore.eval.baselines import PRINCIPLES, make_simulator, patient_psi_prompt
from eeyore.serve.client import ChatClient, Sampling
from eeyore.eval.conversation import COUNSELLOR_SYSTEM, OPENING
from eeyore.eval.interview import questions_for
from eeyore.eval.judge import JUDGE_SYSTEM
from eeyore.eval.report import write_report
from eeyore.eval.runner import EvalConfig, Runner


def scripted(body):
    """Patient: a short reply. Judge: 2 for mild symptoms, 4/5 otherwise, nothing usable for the
    overall severity (so it ends up missing). Counsellor: a question."""
    messages = body["messages"]
    system = messages[0]["content"]
    if system == JUDGE_SYSTEM:
        prompt = messages[1]["content"]
        if "overall depression severity" in prompt:
            return "It is hard to say."
        return "Score: 2" if "at mild severity" in prompt else "I would rate this 4/5."
    if system == COUNSELLOR_SYSTEM:
        return "What happened then?"
    return f"i dunno. {len(messages)}"


def config(tmp_path, ep, **kw):
    base = dict(model="sim", base_url=ep.base_url, judge_model="judge", judge_base_url=ep.base_url,
                end_index=2, max_traits=4, concurrency=4, output_dir=str(tmp_path))
    return EvalConfig(**{**base, **kw})


def run_with(respond, cfg_kw, tmp_path):
    async def go():
        async with FakeEndpoint(respond) as ep:
            results = await Runner(config(tmp_path, ep, **cfg_kw)).run()
            return results, ep.requests

    return asyncio.run(go())


def test_full_run_aggregates_and_resumes_from_the_cache(tmp_path):
    profiles = load_profiles()[:2]
    plan = [t for p in profiles for t in traits(p)]
    assert {t.category for t in plan} == {"mild", "moderate", "severe", "distortion", "overall"}
    results, requests = run_with(scripted, {"max_traits": None}, tmp_path)
    judged = [t for t in plan if t.category != "overall"]
    assert len(requests) == sum(len(questions_for(t)) for t in plan) + len(judged) + 3 * (len(plan) - len(judged))

    adh = results["adherence"]
    mild = [t for t in plan if t.category == "mild"]
    assert adh["mild"]["n"] == len(mild) and adh["mild"]["mean"] == 2.0 and adh["mild"]["ci"] == [2.0, 2.0]
    others = [t for t in judged if t.category != "mild"]
    assert adh["all"]["n"] == len(judged) and adh["all"]["missing"] == len(plan) - len(judged)
    assert adh["all"]["mean"] == pytest.approx((2 * len(mild) + 4 * len(others)) / len(judged))
    assert adh["overall"]["mean"] is None and adh["overall"]["missing"] == sum(t.category == "overall" for t in plan)

    # every session is in the file, with its transcript and judge answers
    sessions = [s for p in results["profiles"] for s in p["traits"]]
    assert [(s["category"], s["trait"]) for s in sessions] == [(t.category, t.name) for t in plan]
    first = sessions[0]
    assert [m["content"] for m in first["messages"][1::2]] == questions_for(plan[0])
    assert first["judge"]["replies"] and results["profiles"][0]["system_prompt"].startswith("You will act")
    assert results["authenticity"]["interview"]["turns"]["simulated"] == sum(len(questions_for(t)) for t in plan)
    assert "api_key" not in json.dumps(results["config"])
    saved = json.loads((tmp_path / "eeyore_sim" / "results.json").read_text())
    assert saved["adherence"] == adh

    # a rerun finds everything in the cache and sends nothing
    again, requests = run_with(lambda body: pytest.fail("cached work was redone"), {"max_traits": None}, tmp_path)
    assert requests == [] and again["adherence"] == adh and again["timing"]["sessions_cached"] == len(plan)
    assert again["profiles"] == results["profiles"]

    # a changed setting is not served from the stale cache
    _, requests = run_with(scripted, {"max_traits": None, "max_tokens": 64}, tmp_path)
    assert requests and all(r.get("max_tokens") == 64 for r in requests if r["model"] == "sim")


def test_failed_sessions_are_recorded_and_retried_on_rerun(tmp_path):
    def flaky(body):  # the patient endpoint is down for one profile's sessions
        if body["model"] == "sim" and "software developer" in body["messages"][0]["content"]:
            return 400, "model overloaded"
        return scripted(body)

    results, _ = run_with(flaky, {}, tmp_path)
    assert results["sessions"]["failed"] == 4 and len(results["failures"]) == 4
    assert "model overloaded" in results["failures"][0]["error"]
    assert len(list((tmp_path / "eeyore_sim" / "cache").glob("*.json"))) == 4
    results, requests = run_with(scripted, {}, tmp_path)
    assert results["sessions"] == {"total": 8, "done": 8, "failed": 0}
    assert results["timing"]["sessions_run"] == 4 and results["timing"]["sessions_cached"] == 4


def test_free_conversations_and_realism(tmp_path):
    results, requests = run_with(scripted, {"free_turns": 3, "judge_realism": True, "max_traits": 1}, tmp_path)
    free = results["profiles"][0]["free"]
    roles = [m["role"] for m in free["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert free["messages"][1]["content"] == OPENING and free["messages"][3]["content"] == "What happened then?"
    counsellor = [r for r in requests if r["messages"][0]["content"] == COUNSELLOR_SYSTEM]
    assert len(counsellor) == 2 * 2  # two counsellor turns per profile
    # the counsellor sees its own turns as assistant and the client's as user
    assert [m["role"] for m in counsellor[0]["messages"]] == ["system", "assistant", "user"]
    assert results["authenticity"]["free"]["turns"]["simulated"] == 2 * 3
    assert results["realism"]["n"] == 2 and results["realism"]["mean"] == 4.0


def test_roleplay_doh_critique_sees_the_conversation(tmp_path):
    def respond(body):
        prompt = body["messages"][-1]["content"]
        if "Turn the principles" in prompt:
            return 'Here you go:\n```json\n{"checks": ["Does the reply avoid lists?"]}\n```'
        if "Actor's draft reply" in prompt:
            return '{"answers": ["no"], "reply": "rewritten reply"}'
        return scripted(body)

    results, requests = run_with(respond, {"experiment": "roleplay-doh", "end_index": 1, "max_traits": 1}, tmp_path)
    session = results["profiles"][0]["traits"][0]
    assert session["messages"][2::2] == [{"role": "assistant", "content": "rewritten reply"}] * 3
    rewrites = [r["messages"][-1]["content"] for r in requests if "Actor's draft reply" in r["messages"][-1]["content"]]
    assert len(rewrites) == 3
    q = questions_for(traits(load_profiles()[0])[0])
    # the third rewrite sees the earlier questions and answers, and the question being answered
    assert f"Supporter: {q[0]}\nClient: rewritten reply\nSupporter: {q[1]}" in rewrites[2]
    assert f"Supporter's last message:\n{q[2]}" in rewrites[2]
    checks = [r for r in requests if "Turn the principles" in r["messages"][-1]["content"]]
    assert PRINCIPLES in checks[0]["messages"][-1]["content"]
    sampling = {(r["temperature"], r["top_p"]) for r in requests if r["model"] == "sim"}
    assert sampling == {(0.7, 1.0)}  # the reference's roleplay-doh settings


def test_roleplay_doh_keeps_the_draft_when_the_critic_is_unusable():
    async def go():
        async with FakeEndpoint(lambda body: "draft" if body["messages"][0]["role"] == "system" else "no json") as ep:
            async with ChatClient(ep.base_url, "sim") as client:
                sim = make_simulator("roleplay-doh", load_profiles()[0], client, Sampling())
                reply = await sim.reply([{"role": "system", "content": sim.system_prompt},
                                         {"role": "user", "content": "hi"}])
                return reply, len(ep.requests)

    assert asyncio.run(go()) == ("draft", 1 + 2 * 1)  # draft + 2 attempts that stop at the checks


def test_patient_psi_prompt(tmp_path):
    p = load_profiles()[0]
    prompt = patient_psi_prompt(p)
    cog = p.cognitive
    for text in (cog["life_history"], cog["core_belief_description"], cog["cognitive_models"][0]["situation"],
                 cog["cognitive_models"][0]["automatic_thoughts"], "- occupation: night-shift nurse", "at most 5 sentences"):
        assert text in prompt
    assert cog["cognitive_models"][1]["situation"] not in prompt
    del p.record["cognitive profile"]
    p.cognitive = None
    with pytest.raises(ProfileError, match="profile 0 .*needs a 'cognitive profile'"):
        patient_psi_prompt(p)
    results, requests = run_with(scripted, {"experiment": "patient-psi", "end_index": 1, "max_traits": 1}, tmp_path)
    assert {(r["temperature"], r["top_p"]) for r in requests if r["model"] == "sim"} == {(0.8, 1.0)}
    assert results["profiles"][0]["system_prompt"].startswith("Imagine you are a person")


def test_cli_reference_flags_and_report(tmp_path, capsys):
    cfg = parse_args(["--experiment-name=eeyore", "--experiment-model=m", "--base-url=http://x/v1", "--api-key=k",
                      "--temperature=1.0", "--top-p=0.8", "--profile-path", "p.json", "--openai-api-key", "sk"])
    assert (cfg.model, cfg.base_url, cfg.api_key, cfg.temperature, cfg.top_p) == ("m", "http://x/v1", "k", 1.0, 0.8)
    assert cfg.profiles == "p.json" and cfg.judge_api_key == "sk" and cfg.max_tokens == 4096
    assert parse_args(["--experiment-name", "patient-psi"]).temperature == 0.8
    with pytest.raises(SystemExit):
        parse_args(["--judge-realism"])
    assert cli_main(["--profiles", str(tmp_path / "nope.json")]) == 2
    assert "profiles file not found" in capsys.readouterr().err

    run_with(scripted, {"free_turns": 2}, tmp_path)
    run_with(scripted, {"experiment": "patient-psi"}, tmp_path)
    report = write_report([tmp_path / "eeyore_sim", tmp_path / "patient-psi_sim" / "results.json"], tmp_path / "rep")
    text = report.read_text()
    assert "| eeyore_sim | eeyore | sim | " in text and "| patient-psi_sim | patient-psi | sim |" in text
    assert "eeyore_sim (free)" in text and "patient-psi_sim (interview)" in text
    assert "| first_person |" in text and "| score | 100 |" in text
    assert (tmp_path / "rep" / "adherence.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "authenticity.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no results at"):
        write_report([tmp_path / "missing"], tmp_path / "rep")
