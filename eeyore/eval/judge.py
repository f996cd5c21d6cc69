"""The LLM judge: rates an interview transcript 1-5 for one trait, and (optionally) a free
conversation for realism; parses the score out of whatever text the judge writes.

The score is asked for as `{"score": 1..5}` through `response_format` (a JSON schema) while the
endpoint accepts it: with constrained decoding even a small judge model then always answers a
score. An endpoint that refuses the field gets the plain prompt, and the free text is parsed.

Fixes over the reference: the system message and the prompt ask for the same thing (a 1-5
number, the reference's system message asked for Yes/No); the score is found in free text
("Score: 4", "**4**/5", "I'd give it a four"); unparsable answers are retried with a reminder
and, if still unparsable, recorded as missing (None) — never as -1 averaged in.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from eeyore.serve.client import ChatClient, Sampling
from eeyore.serve.structured import chat_formatted
from eeyore.eval.interview import Transcript, plain_words
from eeyore.profile import Trait

JUDGE_SYSTEM = (
    "You are a clinical psychologist who assesses how faithfully a simulated client portrays a "
    "given profile. You always answer with a single whole number from 1 to 5."
)
SCALE = (
    "5 = fully consistent with the trait; 4 = mostly consistent; 3 = partly consistent; "
    "2 = barely consistent; 1 = absent or contradicted."
)
CATEGORY_QUESTIONS = {
    "mild": "Does the client show this symptom at a mild level: present and acknowledged, but not "
            "dominating their answers or their life?",
    "moderate": "Does the client show this symptom at a moderate level: a clear, recurring struggle that "
                "affects daily life without overwhelming it?",
    "severe": "Does the client show this symptom at a severe level: intense, pervasive distress that "
              "seriously disrupts their life, conveyed convincingly rather than exaggerated or contradicted?",
    "distortion": "Does this thinking pattern show up in how the client reasons about their own experiences, "
                  "naturally, rather than being named or recited?",
    "overall": "Do the client's mood, engagement and tone across the whole interview match the stated "
               "overall depression severity?",
}
TRAIT_PROMPT = """Below is an interview between an interviewer and a simulated client. Rate how well the client's answers portray the trait from their profile.

Interview:
<<<
{dialogue}
>>>

Trait: {trait}

Question: {question}

Scale: {scale}
Reply with the number only."""
REALISM_PROMPT = """Below is a conversation between a supporter and a client who is meant to be a real person with depression. Rate how much the client sounds like a real person (plain everyday language, answers that unfold gradually, no lists or advice-giving, no therapist-like insight) rather than an AI playing a role.

Conversation:
<<<
{dialogue}
>>>

Scale: 5 = indistinguishable from a real person; 4 = mostly realistic; 3 = mixed; 2 = mostly artificial; 1 = clearly an AI.
Reply with the number only."""
REMINDER = "Please reply with a single number from 1 to 5 and nothing else."
SCORE_FORMAT = {"type": "json_schema", "json_schema": {"name": "judge_score", "strict": True, "schema": {
    "type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["score"], "additionalProperties": False}}}

_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUM = r"([1-5]|one|two|three|four|five)(?:\.0)?"
_RANGE = re.compile(r"\b(?:from\s+)?1\s*(?:-|–|—|to|through)\s*5\b", re.I)  # "1-5", "from 1 to 5"
_OUT_OF = re.compile(_NUM + r"\s*(?:/|out of)\s*5\b", re.I)
_LABELLED = re.compile(
    r"\b(?:score|rating|rate|rated|grade|give it|give this|answer|verdict)\b\W{0,3}(?:is|of|as|an?|at|:|=|\s)*" + _NUM + r"\b",
    re.I,
)
_LONE = re.compile(r"(?<![\d.])([1-5])(?![\d]|\.\d)")


def parse_score(text: str | None) -> int | None:
    """The 1-5 score a judge gave ({"score": n} as asked for, or free text), or None when the
    text does not state one unambiguously."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and "score" in data:
        score = data["score"]
        return score if type(score) is int and 1 <= score <= 5 else None
    plain = _RANGE.sub(" ", re.sub(r"[*_`#]", "", text)).strip()
    for pattern in (_OUT_OF, _LABELLED):
        found = pattern.findall(plain)
        if found:  # the last one is the verdict when a judge revises itself
            word = found[-1].lower()
            return _WORDS.get(word) or int(word)
    digits = {int(d) for d in _LONE.findall(plain)}
    if len(digits) == 1:
        return digits.pop()
    last_line = plain.splitlines()[-1].strip().rstrip(".") if plain else ""
    return int(last_line) if re.fullmatch(r"[1-5]", last_line) else None


@dataclass
class Verdict:
    score: int | None  # None: the judge never gave a parsable score (counted as missing)
    replies: list[str] = field(default_factory=list)  # every raw judge answer, in order


def describe_trait(trait: Trait) -> str:
    if trait.category == "overall":
        return f"overall depression severity: {trait.name}"
    if trait.category == "distortion":
        return f"cognitive distortion: {trait.name} ({plain_words(trait)}), exhibited"
    return f"symptom: {trait.name}, at {trait.category} severity"


async def rate(judge: ChatClient, prompt: str, sampling: Sampling, attempts: int = 3) -> Verdict:
    """Ask, and re-ask with a reminder while the answer holds no parsable score."""
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
    verdict = Verdict(None)
    for _ in range(attempts):
        reply = await chat_formatted(judge, messages, sampling, SCORE_FORMAT)
        verdict.replies.append(reply)
        verdict.score = parse_score(reply)
        if verdict.score is not None:
            break
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": REMINDER}]
    return verdict


async def judge_trait(judge: ChatClient, transcript: Transcript, trait: Trait, sampling: Sampling,
                      attempts: int = 3) -> Verdict:
    prompt = TRAIT_PROMPT.format(
        dialogue=transcript.dialogue(), trait=describe_trait(trait),
        question=CATEGORY_QUESTIONS[trait.category], scale=SCALE,
    )
    return await rate(judge, prompt, sampling, attempts)


async def judge_realism(judge: ChatClient, transcript: Transcript, sampling: Sampling, attempts: int = 3) -> Verdict:
    prompt = REALISM_PROMPT.format(dialogue=transcript.dialogue(other="Supporter"))
    return await rate(judge, prompt, sampling, attempts)
