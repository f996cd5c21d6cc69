"""The conversation being held, and its file: rewritten whole after every turn (atomically), so
an interrupted session loses at most the reply that was being generated."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Transcript:
    path: Path
    system_prompt: str
    meta: dict[str, Any]  # profile, backend and sampling: what a reader needs to reproduce the session
    messages: list[dict[str, str]] = field(default_factory=list)  # user = counsellor, assistant = client
    started: float = field(default_factory=time.time)
    ended_by: str | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        """What the model is sent: the system prompt, then every turn so far."""
        return [{"role": "system", "content": self.system_prompt}, *self.messages]

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def to_json(self) -> dict[str, Any]:
        return {
            **self.meta,
            "started": _iso(self.started), "saved": _iso(time.time()), "ended_by": self.ended_by,
            "roles": {"user": "counsellor (you)", "assistant": "simulated client"},
            "messages": self.chat_messages(),
        }

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.path


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
