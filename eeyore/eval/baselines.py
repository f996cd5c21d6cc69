"""Simulated clients: the model under test prompted with the profile (eeyore), and the two
prompting baselines of the paper, written in our own words.

- Roleplay-doh: the profile prompt, then every draft reply goes through a principle-guided
  critique-and-rewrite (first the principles are turned into yes/no checks for this reply, then a
  critic answers them and rewrites). The critic sees the conversation so far (the reference
  passed it an empty history).
- Patient-Psi: a CBT cognitive-model prompt built from the record's `cognitive profile`, at most
  five sentences per reply.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from eeyore.serve.client import ChatClient, Sampling
from eeyore.profile import Profile, ProfileError, profile_lines, render_system_prompt

EXPERIMENTS = ("eeyore", "roleplay-doh", "patient-psi")
# (temperature, top_p) each experiment ran at in the reference.
REFERENCE_SAMPLING = {"eeyore": (1.0, 0.8), "roleplay-doh": (0.7, 1.0), "patient-psi": (0.8, 1.0)}


@dataclass
class Simulator:
    """A simulated client: its system prompt and how it answers a conversation."""

    client: ChatClient
    system_prompt: str
    sampling: Sampling

    async def reply(self, messages: list[dict[str, str]]) -> str:
        """messages: system prompt first, the supporter's latest message last."""
        return (await self.client.chat(messages, self.sampling)).strip()


# ------------------------------------------------------------------ Roleplay-doh

PRINCIPLES = """- Talk like an ordinary person: everyday words, loose grammar, run-on or unfinished sentences; no clinical vocabulary.
- Keep replies short unless the moment really calls for more; never use lists, headings or bullet points.
- Let the story come out gradually, in answer to what is asked, instead of disclosing everything at once.
- Show confusion, doubt and mixed feelings rather than neat conclusions or insight into yourself.
- Meet encouragement and praise with hesitation; do not accept reassurance straight away.
- Do not give advice, summarise the conversation or sound like a therapist.
- Do not thank the listener over and over or be excessively polite.
- Show reluctance or guardedness about opening up or seeking help when the profile suggests resistance.
- Express emotions through concrete situations and reactions rather than by naming them.
- Stay consistent with the profile and with everything already said in the conversation."""

CHECKS_PROMPT = """You help a role-play actor who plays a client talking to a supporter. Here are principles for a realistic portrayal:
{principles}

Conversation so far:
{history}

The actor's draft reply:
{draft}

Turn the principles that matter for this particular reply into yes/no checks ("Does the reply ...?"). Return only JSON: {{"checks": ["...", "..."]}}"""

REWRITE_PROMPT = """You review and improve the replies of an actor who plays a client talking to a supporter.

Client profile:
{persona}

Conversation so far:
{history}

Supporter's last message:
{last}

Actor's draft reply:
{draft}

Checks:
{checks}

Answer each check with yes, no or n/a. If any answer is no, write a new reply that passes every check, stays true to the profile and the conversation, and shows feelings indirectly rather than naming them; do not simply paraphrase the draft and do not open with a greeting mid-conversation. If every check passes, return the draft unchanged. Return only JSON: {{"answers": ["..."], "reply": "..."}}"""


def _json_object(text: str) -> dict | None:
    """The outermost {...} of a model's answer parsed as JSON (models wrap it in prose/fences)."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        value = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _history(messages: list[dict[str, str]]) -> str:
    names = {"user": "Supporter", "assistant": "Client"}
    lines = [f"{names[m['role']]}: {m['content'].strip()}" for m in messages if m["role"] != "system"]
    return "\n".join(lines) or "(none yet)"


@dataclass
class RoleplayDoh(Simulator):
    persona: str = ""
    attempts: int = 2  # the rewrite is retried once when its JSON is unusable, then the draft is kept

    async def reply(self, messages: list[dict[str, str]]) -> str:
        draft = await super().reply(messages)
        for _ in range(self.attempts):
            rewritten = await self._rewrite(messages, draft)
            if rewritten:
                return rewritten
        return draft

    async def _rewrite(self, messages: list[dict[str, str]], draft: str) -> str | None:
        history = _history(messages)
        ask = CHECKS_PROMPT.format(principles=PRINCIPLES, history=history, draft=draft)
        checks = _json_object(await self.client.chat([{"role": "user", "content": ask}], self.sampling))
        if not checks or not isinstance(checks.get("checks"), list):
            return None
        ask = REWRITE_PROMPT.format(
            persona=self.persona, history=_history(messages[:-1]), last=messages[-1]["content"].strip(),
            draft=draft, checks="\n".join(f"- {c}" for c in checks["checks"]),
        )
        result = _json_object(await self.client.chat([{"role": "user", "content": ask}], self.sampling))
        reply = result.get("reply") if result else None
        return reply.strip() if isinstance(reply, str) and reply.strip() else None


# ------------------------------------------------------------------ Patient-Psi

PATIENT_PSI_PROMPT = """Imagine you are a person who has been struggling with your mental health and has been seeing a therapist for a few weeks. This is who you are:
{persona}

Your background: {history}

How you see yourself and the world (a cognitive conceptualization; let it shape what you say, but never describe it in these terms):
- Core belief: {core_beliefs} ({core_belief_description})
- Rules you usually live by: {intermediate_beliefs}
- Rules you fall back on when depressed: {intermediate_beliefs_during_depression}
- How you cope: {coping_strategies}

This session, the therapist will ask about your past week. The situation on your mind:
- Situation: {situation}
- Automatic thoughts: {automatic_thoughts}
- Emotions: {emotion}
- Behaviour: {behavior}

How to play the part:
1. Talk like a real client in cognitive behavioural therapy: natural, sometimes hesitant, with feeling.
2. Do not reveal everything at once; deeper worries come out only as the therapist earns them, so that they have to work out your thoughts for themselves.
3. Stay consistent with your background, beliefs and the situation above.
4. Respond to what the therapist actually says and keep the conversation flowing.
5. Use at most 5 sentences per reply. If the therapist just greets you, greet them back and start talking as the client."""


def patient_psi_prompt(profile: Profile) -> str:
    cog = profile.cognitive
    if cog is None:
        raise ProfileError(f"{profile.label}: the patient-psi baseline needs a 'cognitive profile'")
    # The reference built every session around the first cognitive model; so do we.
    model = cog["cognitive_models"][0]
    return PATIENT_PSI_PROMPT.format(
        persona=profile_lines(profile), history=cog["life_history"], core_beliefs=cog["core_beliefs"],
        core_belief_description=cog["core_belief_description"], intermediate_beliefs=cog["intermediate_beliefs"],
        intermediate_beliefs_during_depression=cog["intermediate_beliefs_during_depression"],
        coping_strategies=cog["coping_strategies"], **{k: model[k] for k in ("situation", "automatic_thoughts", "emotion", "behavior")},
    )


def make_simulator(experiment: str, profile: Profile, client: ChatClient, sampling: Sampling,
                   style: str = "eval") -> Simulator:
    """The simulated client for one profile under one experiment."""
    if experiment == "eeyore":
        return Simulator(client, render_system_prompt(profile, style), sampling)
    if experiment == "roleplay-doh":
        return RoleplayDoh(client, render_system_prompt(profile, style), sampling, persona=profile_lines(profile, style))
    if experiment == "patient-psi":
        return Simulator(client, patient_psi_prompt(profile), sampling)
    raise ValueError(f"unknown experiment {experiment!r} (expected one of {', '.join(EXPERIMENTS)})")
