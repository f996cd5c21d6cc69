"""The interview plan (each trait is asked about itself) and the interview loop."""
import asyncio

import pytest

from eeyore.profile import Trait, load_profiles, traits
from eeyore.eval.interview import (DISTORTION_PLAIN_WORDS, OVERALL_QUESTIONS, interview, plain_words,
                                   questions_for)

from shared_data import SHARED_PROFILES as SHARED


def all_profiles():
    return load_profiles() + (load_profiles(SHARED) if SHARED.exists() else [])


def test_every_trait_appears_in_its_own_questions():
    for p in all_profiles():
        plan = traits(p)
        for t in plan:
            qs = questions_for(t)
            if t.category == "overall":
                assert qs == list(OVERALL_QUESTIONS)
                continue
            assert len(qs) == 3
            assert all(plain_words(t) in q for q in qs), (p.label, t)
            # and no other trait of the profile leaks into them (the reference's in-place mutation bug)
            others = {plain_words(o) for o in plan if o.category != "overall" and plain_words(o) != plain_words(t)}
            assert not any(o in q for q in qs for o in others if o not in plain_words(t)), (p.label, t)


def test_questions_are_fresh_lists_and_cover_the_protocol():
    t = Trait("mild", "greater impulsivity")
    first = questions_for(t)
    first[0] = "mutated"
    assert questions_for(t)[0] != "mutated"
    assert questions_for(Trait("severe", "greater impulsivity")) == questions_for(t)  # same 3 for every level
    q = questions_for(t)
    assert "going through lately" in q[0] and "everyday life" in q[1] and "mild, moderate, or severe" in q[2]
    d = questions_for(Trait("distortion", "Catastrophic thinking"))
    assert all(DISTORTION_PLAIN_WORDS["catastrophic thinking"] in x for x in d)
    assert "recent time" in d[0] and "situations or people" in d[1] and "how you see yourself" in d[2]
    assert len(OVERALL_QUESTIONS) == 5
    # a distortion we have no plain words for is still named
    assert "mind reading" in questions_for(Trait("distortion", "Mind reading"))[0]


class EchoClient:
    """Replies with the number of messages it was shown, so the test sees the context grow."""

    system_prompt = "SYSTEM"

    def __init__(self):
        self.seen = []

    async def reply(self, messages):
        self.seen.append([dict(m) for m in messages])
        return f"answer {len(messages)}"


def test_interview_asks_one_question_at_a_time_in_context():
    sim = EchoClient()
    t = Trait("moderate", "anxiety, agitation, or restlessness")
    transcript = asyncio.run(interview(sim, t))
    qs = questions_for(t)
    assert [m["role"] for m in transcript.messages] == ["system"] + ["user", "assistant"] * 3
    assert [m["content"] for m in transcript.messages[1::2]] == qs
    assert transcript.client_turns() == ["answer 2", "answer 4", "answer 6"]
    assert sim.seen[2][-1] == {"role": "user", "content": qs[2]} and len(sim.seen[2]) == 6
    text = transcript.dialogue()
    assert "SYSTEM" not in text and text.startswith(f"Interviewer: {qs[0]}\nClient: answer 2")


@pytest.mark.parametrize("category", ["mild", "moderate", "severe", "distortion", "overall"])
def test_every_category_has_a_judge_question(category):
    from eeyore.eval.judge import CATEGORY_QUESTIONS, describe_trait

    assert CATEGORY_QUESTIONS[category]
    assert "greater impulsivity" in describe_trait(Trait(category, "greater impulsivity"))
