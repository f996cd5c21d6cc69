"""The profile-adherence interview: which questions each trait gets, and asking them.

Every trait starts a fresh conversation from the client's system prompt; the interviewer asks
its questions one at a time and the client answers each before the next is asked. Questions are
built per trait from templates (never edited in place: the reference mutated its shared list, so
every trait after the first was asked about the first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from eeyore.profile import Trait

SYMPTOM_QUESTIONS = (
    "I'd like to ask about something specific: {trait}. Is that something you've been going through lately?",
    "How much does {trait} get in the way of your everyday life, like work, looking after yourself, "
    "or the things you used to enjoy?",
    "If you had to say how bad {trait} is for you right now, would you call it mild, moderate, or severe?",
)
DISTORTION_QUESTIONS = (
    "Can you think of a recent time you caught yourself {trait}? What was going on?",
    "Are there particular situations or people that tend to get you {trait}?",
    "When you end up {trait}, what does it do to your mood and to how you see yourself?",
)
OVERALL_QUESTIONS = (
    "How would you describe your mood over the last few weeks?",
    "Are the things you used to look forward to still enjoyable for you, or has that changed?",
    "How is your energy these days? Do you find yourself worn out a lot?",
    "Do you find yourself feeling guilty or worthless, or being really hard on yourself?",
    "Have there been times you felt hopeless, like nothing will get better, or had thoughts about death?",
)
# Clients do not talk in textbook terms, so distortions are asked about in plain words.
DISTORTION_PLAIN_WORDS = {
    "selective abstraction": "focusing on one bad detail and losing sight of everything else",
    "overgeneralizing": "deciding that one bad experience means things will always go wrong",
    "personalization": "blaming yourself for things that weren't really in your control",
    "catastrophic thinking": "expecting the worst possible thing to happen",
    "minimisation": "brushing off your own strengths or the good things you do",
    "arbitrary inference": "jumping to a negative conclusion without much to go on",
}


def plain_words(trait: Trait) -> str:
    """How the interviewer names the trait to the client."""
    if trait.category == "distortion":
        return DISTORTION_PLAIN_WORDS.get(trait.name.lower(), f"thinking in terms of {trait.name.lower()}")
    return trait.name.lower()


def questions_for(trait: Trait) -> list[str]:
    """The interviewer's questions for one trait (a new list each call)."""
    if trait.category == "overall":
        return list(OVERALL_QUESTIONS)
    templates = DISTORTION_QUESTIONS if trait.category == "distortion" else SYMPTOM_QUESTIONS
    return [t.format(trait=plain_words(trait)) for t in templates]


@dataclass
class Transcript:
    """A conversation with the simulated client: messages[0] is the system prompt."""

    messages: list[dict[str, str]] = field(default_factory=list)

    def client_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    def dialogue(self, client: str = "Client", other: str = "Interviewer") -> str:
        """The conversation as plain text for a judge, without the system prompt."""
        names = {"user": other, "assistant": client}
        return "\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in self.messages if m["role"] != "system")


async def interview(simulator, trait: Trait) -> Transcript:
    """Ask the trait's questions one at a time; the client answers each in context."""
    messages = [{"role": "system", "content": simulator.system_prompt}]
    for question in questions_for(trait):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": await simulator.reply(messages)})
    return Transcript(messages)
