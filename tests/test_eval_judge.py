"""Judge: score parsing from messy free text, the retry with a reminder, missing scores."""
import asyncio

import pytest
from eval_fakes import FakeEndpoint

from eeyore.profile import Trait
from eeyore.serve.client import ChatClient, Sampling
from eeyore.eval.interview import Transcript
from eeyore.eval.judge import JUDGE_SYSTEM, REMINDER, judge_realism, judge_trait, parse_score


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
