"""What a newcomer read in the evaluator's help, summary and report agrees with what it did and
with results.json: the run folder, both authenticity scores, realism with every score missing,
timing across reruns, and charts that never draw a missing category as a zero."""
import asyncio
import json
import threading

import pytest
from eval_fakes import FakeEndpoint

from eeyore.eval.__main__ import main as cli_main, parse_args
from eeyore.eval.conversation import COUNSELLOR_SYSTEM
from eeyore.eval.judge import JUDGE_SYSTEM
from eeyore.eval.report import adherence_figure, authenticity_figure, load_run, write_report
from eeyore.eval.runner import EvalConfig, Runner

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def scripted(body):
    """The judge scores traits 4 but never gives realism a usable score, nor the overall severity."""
    messages = body["messages"]
    if messages[0]["content"] == JUDGE_SYSTEM:
        prompt = messages[1]["content"]
        return "hard to say" if "realistic" in prompt.lower() or "overall depression severity" in prompt else "Score: 4"
    if messages[0]["content"] == COUNSELLOR_SYSTEM:
        return "And how did that feel?"
    return f"i guess so. it has been a long week, {len(messages)} days of it."


class ThreadedEndpoint:
    """FakeEndpoint on its own loop, for code under test that runs asyncio.run itself (the CLI)."""

    def __init__(self, respond):
        self.ep, self.loop = FakeEndpoint(respond), asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.ep.__aenter__(), self.loop).result()
        self.base_url = self.ep.base_url

    def close(self):
        asyncio.run_coroutine_threadsafe(self.ep.__aexit__(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def endpoint():
    ep = ThreadedEndpoint(scripted)
    yield ep
    ep.close()


def cli_args(ep, tmp_path, *more):
    return ["--experiment-model", "sim", "--base-url", ep.base_url, "--judger-base-url", ep.base_url,
            "--judger-model", "judge", "--end-index", "2", "--max-traits", "3", "--output-dir", str(tmp_path), *more]


def test_run_name_help_names_the_folder_written():
    help_text = " ".join(_help().split())
    for experiment, model in (("eeyore", "gpt-4o-2024-08-06"), ("patient-psi", "org/model")):
        folder = parse_args(["--experiment-name", experiment, "--experiment-model", model]).run_dir.name
        assert f"e.g. eeyore_gpt-4o-2024-08-06 or patient-psi_org-model" in help_text
        assert folder in help_text
    assert parse_args(["--experiment-model", "a  b/c"]).run_dir.name == "eeyore_a-b-c"


def _help():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return out.getvalue()


def test_realism_with_every_score_missing_is_printed_and_reported(endpoint, tmp_path, capsys):
    assert cli_main(cli_args(endpoint, tmp_path, "--free-turns", "2", "--judge-realism")) == 0
    out = capsys.readouterr().out
    assert "realism n/a  (n=0, missing=2)" in out
    results = json.loads((tmp_path / "eeyore_sim" / "results.json").read_text())
    assert results["realism"]["missing"] == 2
    for source in ("interview", "free"):
        assert f"authenticity ({source}): {results['authenticity'][source]['score']:.1f} / 100" in out

    text = write_report([tmp_path / "eeyore_sim"], tmp_path / "rep").read_text()
    assert "| eeyore_sim | no scores (2 missing) |" in text
    # both authenticity scores, each column naming the turns it measures, as the summary printed them
    assert "eeyore_sim (interview) | eeyore_sim (free) |" in text
    for source in ("interview", "free"):
        assert f"**{results['authenticity'][source]['score']:.1f}**" in text
    assert "| no scores (2 missing) |" in text  # the overall category: every judgement unusable


def test_rerunning_a_finished_run_keeps_its_timing(endpoint, tmp_path):
    cfg = EvalConfig(model="sim", base_url=endpoint.base_url, judge_model="judge", judge_base_url=endpoint.base_url,
                     end_index=1, max_traits=2, output_dir=str(tmp_path))
    first = asyncio.run(Runner(cfg).run())["timing"]
    assert first["requests"] > 0 and first["sessions_run"] == 2 and first["invocations"] == 1
    again = asyncio.run(Runner(cfg).run())["timing"]
    assert again["requests"] == first["requests"] and again["sessions_run"] == 0
    assert again["wall_s"] >= first["wall_s"] > 0 and again["sessions_cached"] == 2 and again["invocations"] == 2
    other = EvalConfig(**{**vars(cfg), "max_traits": 1})  # other settings: a fresh account
    assert asyncio.run(Runner(other).run())["timing"]["invocations"] == 1


def test_failed_sessions_are_listed_in_the_report(tmp_path):
    calls = []

    def refuse_first(body):  # the first client request of the run fails for good (400: no retry)
        if body["messages"][0]["content"] not in (JUDGE_SYSTEM, COUNSELLOR_SYSTEM):
            calls.append(1)
            if len(calls) == 1:
                return 400, "bad | request"
        return scripted(body)

    async def go():
        async with FakeEndpoint(refuse_first) as ep:
            cfg = EvalConfig(model="sim", base_url=ep.base_url, judge_model="judge", judge_base_url=ep.base_url,
                             end_index=1, max_traits=3, concurrency=1, output_dir=str(tmp_path))
            return await Runner(cfg).run()

    results = asyncio.run(go())
    assert len(results["failures"]) == 1
    text = write_report([tmp_path / "eeyore_sim"], tmp_path / "rep").read_text()
    assert "## Failed sessions" in text and "bad \\| request" in text and "| 2/3 | 1 |" in text


def test_charts_label_empty_categories_and_authenticity_sources(endpoint, tmp_path):
    args = cli_args(endpoint, tmp_path, "--free-turns", "2")
    assert cli_main(args[:args.index("--max-traits")] + args[args.index("--max-traits") + 2:]) == 0  # every trait
    run = load_run(tmp_path / "eeyore_sim")
    assert run["adherence"]["overall"]["n"] == 0 and run["adherence"]["mild"]["n"] > 0

    fig = adherence_figure([run])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("no scores") == sum(run["adherence"][c]["n"] == 0 for c in run["adherence"])
    assert f"n={run['adherence']['all']['n']}" in texts
    assert len([t for t in texts if t.startswith("n=")]) == sum(s["n"] > 0 for s in run["adherence"].values())

    fig = authenticity_figure([run])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    n_interview = run["authenticity"]["interview"]["turns"]["simulated"]
    n_free = run["authenticity"]["free"]["turns"]["simulated"]
    assert labels[1:] == [f"eeyore_sim\ninterviews n={n_interview}", f"eeyore_sim\nfree conv. n={n_free}"]
    assert labels[0].startswith("real clients\nn=")
    assert "interview answers and free-conversation turns" in fig._suptitle.get_text()
