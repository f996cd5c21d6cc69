"""Judge: score parsing from messy free text, the retry with a reminder, missing scores; the
score asked for as JSON through response_format, and the fallback when an endpoint refuses it."""
import asyncio
import json

import pytest
from eval_fakes import FakeEndpoint

from eeyore.profile import Trait
from eeyore.serve.client import ChatClient, Sampling
from eeyore.eval.interview import Transcript
from eeyore.eval.judge import JUDGE_SYSTEM, REMINDER, SCORE_FORMAT, judge_realism, judge_trait, parse_score


@pytest.mark.parametrize("text, score", [
    ("4", 4), (" 5.\n", 5), ("**3**", 3), ("Score: 4", 4), ("Rating: 2/5", 2), ("Rating = 5/5", 5),
    ("I would rate this a 4 out of 5.", 4),
    ("On a scale from 1 to 5, I'd give it a 4.", 4),
    ("Using the 1-5 scale: 5", 5),
    ("The client shows moderate alignment.\n\n3", 3),
    ("4 - moderate alignment", 4),
    ("1 (no alignment or contradiction)", 1),
    ("Score: four", 4),
    ("The answer is 5", 5),
    ("Rating: 3\n\nExplanation: the client mentions 2 examples of it.", 3),
    ("The client answered 3 questions. Final score: 2", 2),
    ("Initially I thought 2, but on reflection my rating is 4", 4),
    ("```\n5\n```", 5),
])
def test_parse_score_from_messy_judge_output(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text", [
    None, "", "Yes", "I cannot determine this.", "Between 3 and 4", "4.5", "Score: 7", "10", "0",
    "On a scale of 1 to 5.",  # the range alone is not a score
])
def test_unparsable_scores_are_missing(text):
    assert parse_score(text) is None


def _transcript():
    return Transcript([{"role": "system", "content": "SECRET PROFILE"},
                       {"role": "user", "content": "How have you been sleeping?"},
                       {"role": "assistant", "content": "barely. like 3 hours"}])


def test_judge_retries_with_a_reminder_then_scores():
    answers = iter(["The client seems consistent.", "Yes", "Score: 5"])

    async def go():
        async with FakeEndpoint(lambda body: next(answers)) as ep, ChatClient(ep.base_url, "judge") as judge:
            v = await judge_trait(judge, _transcript(), Trait("severe", "sleep disturbances"), Sampling(0.0))
            return v, ep.requests

    verdict, requests = asyncio.run(go())
    assert verdict.score == 5 and verdict.replies == ["The client seems consistent.", "Yes", "Score: 5"]
    assert len(requests) == 3
    first = requests[0]["messages"]
    assert first[0] == {"role": "system", "content": JUDGE_SYSTEM} and "1 to 5" in first[0]["content"]
    prompt = first[1]["content"]
    assert "Interviewer: How have you been sleeping?\nClient: barely. like 3 hours" in prompt
    assert "SECRET PROFILE" not in prompt  # the judge sees the transcript, not the system prompt
    assert "symptom: sleep disturbances, at severe severity" in prompt and "severe level" in prompt
    assert requests[2]["messages"][-2:] == [{"role": "assistant", "content": "Yes"}, {"role": "user", "content": REMINDER}]
    assert requests[0]["temperature"] == 0.0


def test_judge_gives_up_and_records_missing():
    async def go():
        async with FakeEndpoint(lambda body: "I refuse to rate.") as ep, ChatClient(ep.base_url, "judge") as judge:
            return await judge_realism(judge, _transcript(), Sampling(), attempts=2), len(ep.requests)

    verdict, n = asyncio.run(go())
    assert verdict.score is None and n == 2 and len(verdict.replies) == 2


def test_judge_asks_for_a_json_score_and_reads_it():
    async def go():
        async with FakeEndpoint(lambda body: '{"score": 4}') as ep, ChatClient(ep.base_url, "judge") as judge:
            v = await judge_trait(judge, _transcript(), Trait("mild", "sleep disturbances"), Sampling(0.0))
            return v, ep.requests

    verdict, requests = asyncio.run(go())
    assert verdict.score == 4 and len(requests) == 1
    assert requests[0]["response_format"] == SCORE_FORMAT
    assert SCORE_FORMAT["json_schema"]["schema"]["properties"]["score"] == {"type": "integer", "minimum": 1, "maximum": 5}


@pytest.mark.parametrize("text, score", [('{"score": 3}', 3), ('{"score": 7}', None), ('{"score": "4"}', None),
                                         ('{"score": true}', None), ('{"mark": 2}', 2)])
def test_parse_score_reads_the_json_score(text, score):
    assert parse_score(text) == score


def test_judge_falls_back_to_free_text_when_response_format_is_refused():
    def no_schema(body):
        if "response_format" in body:
            return 400, "only response_format {'type': 'text'} is supported"
        return "Score: 3"

    async def go():
        async with FakeEndpoint(no_schema) as ep, ChatClient(ep.base_url, "judge", retries=0) as judge:
            first = await judge_realism(judge, _transcript(), Sampling())
            second = await judge_realism(judge, _transcript(), Sampling())
            return first, second, ep.requests

    first, second, requests = asyncio.run(go())
    assert first.score == 3 and second.score == 3
    assert ["response_format" in r for r in requests] == [True, False, False]  # learnt once, then plain


def test_the_embedded_model_through_our_server_now_gives_scores(smollm2_dir):
    """The weak embedded model as judge: free text rarely held a score; with the JSON schema
    every answer is one."""
    from serve_fixtures import LiveServer

    from eeyore.serve.engine import Engine

    srv = LiveServer(lambda: Engine.from_pretrained(smollm2_dir, max_batch_size=4, max_model_len=2048), name="smol")

    async def go():
        async with ChatClient(srv.url + "/v1", "smol", retries=0) as judge:
            return [await judge_trait(judge, _transcript(), trait, Sampling(temperature=t, max_tokens=16), attempts=1)
                    for trait, t in ((Trait("severe", "sleep disturbances"), 0.0), (Trait("distortion", "personalization"), 1.0))]

    try:
        verdicts = asyncio.run(go())
    finally:
        srv.close()
    for v in verdicts:
        assert v.score in range(1, 6) and json.loads(v.replies[0]) == {"score": v.score}
