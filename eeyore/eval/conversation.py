"""Free conversation: a counsellor LLM (any endpoint) talks with the simulated client.

This gives client turns in a natural setting for the authenticity metrics and the realism
judge (the interview's targeted questions are a narrower setting). The counsellor sees the
conversation from its side: its own turns as `assistant`, the client's as `user`.
"""
from __future__ import annotations

from eeyore.serve.client import ChatClient, Sampling
from eeyore.eval.interview import Transcript

COUNSELLOR_SYSTEM = (
    "You are a warm, patient peer supporter talking with someone who is going through a hard time. "
    "Listen more than you talk: reflect what you hear, ask one open question at a time, and keep each "
    "reply to one to three sentences. Do not diagnose, lecture, or list advice."
)
OPENING = "Hi, thanks for reaching out. What's been on your mind lately?"


async def free_conversation(simulator, counsellor: ChatClient, sampling: Sampling, turns: int) -> Transcript:
    """`turns` client replies, starting from a fixed counsellor opening (so every profile and
    every experiment starts the same way)."""
    messages = [{"role": "system", "content": simulator.system_prompt}, {"role": "user", "content": OPENING}]
    for turn in range(turns):
        messages.append({"role": "assistant", "content": await simulator.reply(messages)})
        if turn == turns - 1:
            break
        flipped = [{"role": "system", "content": COUNSELLOR_SYSTEM}] + [
            {"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in messages[1:]
        ]
        messages.append({"role": "user", "content": (await counsellor.chat(flipped, sampling)).strip()})
    return Transcript(messages)
