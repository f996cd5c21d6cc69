"""What the studio's pages share: the reply backend and the books each page keeps on disk."""
from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from .annotate import AnnotationQueue
from .backends import EngineBackend, OpenAIBackend
from .practice import PracticeBook
from .profile_review import ReviewBook
from .schema import load_records
from .store import write_json


class Studio:
    def __init__(self, backend: EngineBackend | OpenAIBackend, data_dir: Path, profiles: str | None = None,
                 pairs: str | None = None, annotators: list[str] | None = None) -> None:
        self.backend, self.data_dir = backend, Path(data_dir)
        self.annotators = annotators or []
        self.loading: asyncio.Future | None = None  # the backend's load, started with the app
        self.practice = PracticeBook(self.data_dir / "practice")
        self.reviews = ReviewBook(load_records(profiles), self.data_dir / "profiles")
        self.queue = AnnotationQueue(pairs, self.data_dir / "annotate")

    async def shutdown(self) -> None:
        await self.practice.drain()
        if self.loading is not None:
            await asyncio.wait([self.loading])
        if isinstance(self.backend, OpenAIBackend):
            await self.backend.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.backend.close)


def annotator_tokens(names: list[str], data_dir: Path) -> tuple[dict[str, str], Path]:
    """Each annotator's sign-in token, kept in `<data-dir>/annotators.json` (readable by its owner
    only) so that a restart keeps them; new names get new tokens."""
    path = Path(data_dir) / "annotators.json"
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokens = {name: known.get(name) or secrets.token_urlsafe(16) for name in names}
    if tokens != {k: v for k, v in known.items() if k in tokens} or set(known) - set(tokens):
        write_json(path, {**known, **tokens})
        path.chmod(0o600)
    return tokens, path
