"""One evaluation run: every (profile, trait) interview and judgement, optional free
conversations, then the aggregates, written to `{output_dir}/{run_name}/results.json`.

Jobs (one interview + its judgement, or one free conversation + its realism rating) run
concurrently, at most `concurrency` at a time. Each finished job is written to
`{run_dir}/cache/` under a hash of everything that determines it (model names, settings,
prompts; not the URLs, so a restarted server on another port still finds its work), so an
interrupted or partly failed run picks up where it stopped and a changed setting never reuses
a stale result.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eeyore.eval import authenticity, baselines, conversation, judge
from eeyore.eval.baselines import REFERENCE_SAMPLING, Simulator, make_simulator
from eeyore.serve.client import ChatClient, EndpointError, Sampling
from eeyore.eval.interview import Transcript, interview, questions_for
from eeyore.profile import Profile, Trait, load_profiles, traits
from eeyore.eval.stats import mean_ci

CATEGORIES = ("mild", "moderate", "severe", "distortion", "overall")


@dataclass
class EvalConfig:
    experiment: str = "eeyore"
    model: str = "eeyore"
    base_url: str = "http://127.0.0.1:6416/v1"
    api_key: str | None = "EMPTY"
    temperature: float | None = None  # None: the reference's value for the experiment
    top_p: float | None = None
    max_tokens: int | None = 4096
    judge_model: str = "gpt-4o-2024-08-06"
    judge_base_url: str = "https://api.openai.com/v1"
    judge_api_key: str | None = None
    judge_temperature: float | None = 0.0
    judge_max_tokens: int | None = 256
    judge_attempts: int = 3
    profiles: str | None = None  # None: the sample profiles shipped with the package
    start_index: int = 0
    end_index: int | None = None
    max_traits: int | None = None  # per profile, for quick runs and benchmarks
    concurrency: int = 16
    prompt_style: str = "eval"
    free_turns: int = 0
    counsellor_model: str | None = None  # None: the judge's endpoint and model
    counsellor_base_url: str | None = None
    counsellor_api_key: str | None = None
    judge_realism: bool = False
    reference: str | None = None  # None: the shipped real-client statistics
    output_dir: str = "runs/eval"
    run_name: str | None = None

    def __post_init__(self) -> None:
        temperature, top_p = REFERENCE_SAMPLING.get(self.experiment, (None, None))
        self.temperature = temperature if self.temperature is None else self.temperature
        self.top_p = top_p if self.top_p is None else self.top_p
        self.run_name = self.run_name or f"{self.experiment}_{re.sub(r'[^A-Za-z0-9.-]+', '-', self.model)}"
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.judge_realism and self.free_turns < 1:
            raise ValueError("judge_realism rates the free conversations: set free_turns >= 1")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def public(self) -> dict[str, Any]:
        """The settings for the results file, without secrets."""
        return {k: v for k, v in asdict(self).items() if not k.endswith("api_key")}


@dataclass
class Job:
    profile: Profile
    simulator: Simulator
    trait: Trait | None  # None: the free conversation

    def key(self, cfg: EvalConfig) -> str:
        what = {
            "experiment": cfg.experiment, "model": cfg.model,
            "sampling": [cfg.temperature, cfg.top_p, cfg.max_tokens], "system": self.simulator.system_prompt,
            "judge": [cfg.judge_model, cfg.judge_temperature, cfg.judge_max_tokens, cfg.judge_attempts],
        }
        if cfg.experiment == "roleplay-doh":
            what["rewrite"] = [baselines.PRINCIPLES, baselines.CHECKS_PROMPT, baselines.REWRITE_PROMPT]
        if self.trait is not None:
            what |= {"trait": self.trait.key, "questions": questions_for(self.trait),
                     "prompt": [judge.JUDGE_SYSTEM, judge.TRAIT_PROMPT, judge.CATEGORY_QUESTIONS[self.trait.category]]}
        else:
            what |= {"turns": cfg.free_turns, "counsellor": [cfg.counsellor_model, conversation.COUNSELLOR_SYSTEM,
                                                             conversation.OPENING],
                     "realism": [judge.JUDGE_SYSTEM, judge.REALISM_PROMPT] if cfg.judge_realism else None}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        kind = "free" if self.trait is None else self.trait.category
        return f"p{self.profile.index:03d}-{kind}-{digest}"


class Runner:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.cache_dir = cfg.run_dir / "cache"
        key = cfg.judge_api_key or os.environ.get("OPENAI_API_KEY") or cfg.api_key
        n = cfg.concurrency
        self.patient = ChatClient(cfg.base_url, cfg.model, cfg.api_key, max_connections=n)
        self.judge = ChatClient(cfg.judge_base_url, cfg.judge_model, key, max_connections=n)
        self.counsellor = ChatClient(
            cfg.counsellor_base_url or cfg.judge_base_url, cfg.counsellor_model or cfg.judge_model,
            cfg.counsellor_api_key or key, max_connections=n,
        )
        self.sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens)
        self.judge_sampling = Sampling(cfg.judge_temperature, None, cfg.judge_max_tokens)

    def jobs(self, profiles: list[Profile]) -> list[Job]:
        out = []
        for p in profiles:
            sim = make_simulator(self.cfg.experiment, p, self.patient, self.sampling, self.cfg.prompt_style)
            out += [Job(p, sim, t) for t in traits(p)[: self.cfg.max_traits]]
            if self.cfg.free_turns:
                out.append(Job(p, sim, None))
        return out

    async def run_job(self, job: Job) -> dict[str, Any]:
        if job.trait is None:
            transcript = await conversation.free_conversation(job.simulator, self.counsellor, self.sampling,
                                                              self.cfg.free_turns)
            verdict = (await judge.judge_realism(self.judge, transcript, self.judge_sampling, self.cfg.judge_attempts)
                       if self.cfg.judge_realism else None)
            return {"kind": "free", "messages": transcript.messages, "realism": verdict and asdict(verdict)}
        transcript = await interview(job.simulator, job.trait)
        verdict = await judge.judge_trait(self.judge, transcript, job.trait, self.judge_sampling,
                                          self.cfg.judge_attempts)
        return {"kind": "trait", "category": job.trait.category, "trait": job.trait.name,
                "messages": transcript.messages, "judge": asdict(verdict)}

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        profiles = load_profiles(cfg.profiles)[cfg.start_index: cfg.end_index]
        reference = authenticity.load_reference(cfg.reference)
        jobs = self.jobs(profiles)  # builds every prompt first: a bad profile fails before any request
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        records: dict[int, dict] = {}
        todo = []
        for i, job in enumerate(jobs):
            path = self.cache_dir / f"{job.key(cfg)}.json"
            if path.exists():
                records[i] = json.loads(path.read_text())
            else:
                todo.append(i)
        failures: list[dict] = []
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"eval {cfg.run_name}", unit="session")
        gate = asyncio.Semaphore(cfg.concurrency)
        start = time.perf_counter()

        async def one(i: int) -> None:
            job = jobs[i]
            async with gate:
                try:
                    record = {"profile": job.profile.index, **await self.run_job(job)}
                except EndpointError as e:  # recorded, not cached: a rerun retries it
                    failures.append({"profile": job.profile.index, "trait": job.trait and job.trait.key, "error": str(e)})
                    return
                finally:
                    bar.update(1)
            _write_json(self.cache_dir / f"{job.key(cfg)}.json", record)
            records[i] = record

        try:
            await asyncio.gather(*(one(i) for i in todo))
        finally:
            bar.close()
            await asyncio.gather(self.patient.close(), self.judge.close(), self.counsellor.close())
        wall = time.perf_counter() - start
        clients = (self.patient, self.judge, self.counsellor)
        requests = sum(c.requests for c in clients)
        results = summarize(cfg, profiles, jobs, records, reference, failures)
        now = {"wall_s": wall, "requests": requests, "completion_tokens": sum(c.completion_tokens for c in clients),
               "sessions_run": len(todo)}
        results["timing"] = accumulated_timing(_previous_timing(cfg), now, len(jobs))
        _write_json(cfg.run_dir / "results.json", results)
        return results


def summarize(cfg: EvalConfig, profiles: list[Profile], jobs: list[Job], records: dict[int, dict],
              reference: dict, failures: list[dict]) -> dict[str, Any]:
    """The results file: settings, every transcript and score per profile, and the aggregates."""
    per_profile = {p.index: {"index": p.index, "label": p.label, "system_prompt": None, "traits": [], "free": None}
                   for p in profiles}
    for i, job in enumerate(jobs):
        entry = per_profile[job.profile.index]
        entry["system_prompt"] = job.simulator.system_prompt
        if i in records:
            rec = records[i]
            if rec["kind"] == "free":
                entry["free"] = rec
            else:
                entry["traits"].append(rec)
    trait_recs = [r for r in records.values() if r["kind"] == "trait"]
    adherence = {}
    for cat in (*CATEGORIES, "all"):
        recs = [r for r in trait_recs if cat in ("all", r["category"])]
        scores = [r["judge"]["score"] for r in recs if r["judge"]["score"] is not None]
        adherence[cat] = {**mean_ci(scores), "missing": len(recs) - len(scores)}
    real = reference["metrics"]
    interview_turns = [Transcript(r["messages"]).client_turns() for r in trait_recs]
    free_recs = [r for r in records.values() if r["kind"] == "free"]
    auth = {"reference": reference,
            "interview": authenticity.compare([t for ts in interview_turns for t in ts], real)}
    if free_recs:
        auth["free"] = authenticity.compare([t for r in free_recs for t in Transcript(r["messages"]).client_turns()], real)
    realism = None
    if cfg.judge_realism:
        scores = [r["realism"]["score"] for r in free_recs if r["realism"] and r["realism"]["score"] is not None]
        realism = {**mean_ci(scores), "missing": len(free_recs) - len(scores)}
    return {
        "config": cfg.public(), "adherence": adherence, "authenticity": auth, "realism": realism,
        "sessions": {"total": len(jobs), "done": len(records), "failed": len(failures)}, "failures": failures,
        "profiles": list(per_profile.values()),
    }


def _previous_timing(cfg: EvalConfig) -> dict[str, Any] | None:
    """The timing of earlier invocations of this very run (same settings), if any."""
    try:
        previous = json.loads((cfg.run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    def settings(c: dict[str, Any]) -> dict[str, Any]:  # as the cache: a server on a new port is the same run
        return {k: v for k, v in c.items() if not k.endswith("base_url")}

    same = isinstance(previous.get("config"), dict) and settings(previous["config"]) == settings(cfg.public())
    return previous.get("timing") if same else None


def accumulated_timing(previous: dict[str, Any] | None, now: dict[str, Any], total: int) -> dict[str, Any]:
    """The time and requests that produced the results, summed over the invocations that ran
    sessions: rerunning a finished evaluation (everything cached) keeps the figures it had
    instead of replacing them with this invocation's zeros."""
    t = {k: now[k] + ((previous or {}).get(k) or 0) for k in ("wall_s", "requests", "completion_tokens")}
    t["invocations"] = (previous or {}).get("invocations", 1 if previous else 0) + 1
    t["requests_per_s"] = t["requests"] / t["wall_s"] if t["wall_s"] else None
    # what this invocation did: sessions it ran and sessions it found in the cache
    t |= {"sessions_run": now["sessions_run"], "sessions_cached": total - now["sessions_run"]}
    return t


def _write_json(path: Path, data: Any) -> None:
    # Written whole then renamed, so an interrupted run never leaves a truncated cache entry.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def run(cfg: EvalConfig) -> dict[str, Any]:
    return asyncio.run(Runner(cfg).run())
