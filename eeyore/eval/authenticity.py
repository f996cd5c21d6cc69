"""Linguistic authenticity: how much the simulated client's turns read like real client turns.

The paper claims this but released no method; ours (see docs/evaluation.md):
every client turn gets per-turn metrics — psycholinguistic category rates (first-person
singular and absolutist words from the literature, negative / positive emotion, sadness and
anxiety from the open Empath lexicon, VADER valence), turn length, lexical diversity, and
assistant-style markers (markdown/lists, advice-giving, over-politeness, therapy-speak). The
simulated distribution of each metric is compared with the real one (the client turns of the
reference conversations) by the Kolmogorov-Smirnov statistic (the distance, 0 = same
distribution) and the standardised mean difference; the aggregate score is 100 * (1 - mean KS).

`python -m eeyore.eval.authenticity PROFILES.json` rebuilds the shipped real-client reference.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from eeyore.eval.stats import ks_statistic, standardized_mean_difference

FIRST_PERSON = {"i", "me", "my", "mine", "myself", "i'm", "i've", "i'd", "i'll", "im", "ive"}
# Al-Mosaiwi & Johnstone (2018): the absolutist-word dictionary.
ABSOLUTIST = {
    "absolutely", "all", "always", "complete", "completely", "constant", "constantly", "definitely", "entire",
    "ever", "every", "everyone", "everything", "full", "must", "never", "nothing", "totally", "whole",
}
EMPATH_CATEGORIES = {"negative_emotion": "negative_emotion", "positive_emotion": "positive_emotion",
                     "sadness": "sadness", "anxiety": "nervousness"}
# Phrases typical of an assistant's voice rather than a client's (our lists).
ADVICE = ("you should", "you could try", "try to", "it might help", "it may help", "i recommend", "i suggest",
          "make sure", "remember to", "don't forget", "consider", "it's important to", "it is important to",
          "reach out to", "self-care", "take care of yourself")
POLITENESS = ("thank you", "thanks", "i appreciate", "appreciate it", "grateful", "kind of you", "you're right",
              "that's a great", "great question", "i understand your", "please")
THERAPY_SPEAK = ("coping strategies", "coping mechanism", "boundaries", "validate", "validation", "self-compassion",
                 "mindfulness", "process my emotions", "my feelings are valid", "triggers", "healing journey",
                 "mental health journey", "growth", "self-worth", "i realize that", "i recognize that")
_MARKDOWN = re.compile(r"(^\s*([-*•]|\d+[.)]|#{1,6})\s)|\*\*[^*]+\*\*", re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
MATTR_WINDOW = 25

METRICS = ("words", "lexical_diversity", "first_person", "absolutist", "negative_emotion", "positive_emotion",
           "sadness", "anxiety", "valence", "markdown", "advice", "politeness", "therapy_speak")
EMPATH_METRICS = tuple(EMPATH_CATEGORIES)
VADER_METRICS = ("valence",)


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def mattr(words: Sequence[str], window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio (plain TTR for texts shorter than the window); it does not
    fall with length as plain TTR does, so short and long turns are comparable."""
    if not words:
        return 0.0
    if len(words) <= window:
        return len(set(words)) / len(words)
    return float(np.mean([len(set(words[i:i + window])) / window for i in range(len(words) - window + 1)]))


def count_phrases(text: str, phrases: Sequence[str]) -> int:
    norm = " " + " ".join(tokens(text)) + " "
    return sum(norm.count(" " + " ".join(tokens(p)) + " ") for p in phrases)


@functools.lru_cache(maxsize=1)
def _empath() -> dict[str, frozenset[str]] | None:
    try:
        from empath import Empath  # its lexicon is a local file; only create_category uses the network
    except ImportError:
        return None
    lexicon = Empath()
    return {ours: frozenset(lexicon.cats[theirs]) for ours, theirs in EMPATH_CATEGORIES.items()}


@functools.lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        return None
    return SentimentIntensityAnalyzer()


def available_metrics() -> tuple[str, ...]:
    """METRICS minus those whose lexicon package is not installed (warns once about it)."""
    missing = [m for pkg, ok, ms in (("empath", _empath(), EMPATH_METRICS), ("vaderSentiment", _vader(), VADER_METRICS))
               if ok is None for m in ms]
    if missing:
        warnings.warn(f"authenticity metrics {', '.join(missing)} skipped: install the lexicon packages with "
                      "`pip install empath vaderSentiment` (the eeyore[eval] extra)", stacklevel=2)
    return tuple(m for m in METRICS if m not in missing)


def turn_metrics(text: str) -> dict[str, float]:
    """Every available metric of one client turn; rates are per 100 words."""
    words = tokens(text)
    n = len(words)

    def per100(count: float) -> float:
        return 100.0 * count / n if n else 0.0

    out = {
        "words": float(n),
        "lexical_diversity": mattr(words),
        "first_person": per100(sum(w in FIRST_PERSON for w in words)),
        "absolutist": per100(sum(w in ABSOLUTIST for w in words)),
        "markdown": 1.0 if _MARKDOWN.search(text) else 0.0,
        "advice": per100(count_phrases(text, ADVICE)),
        "politeness": per100(count_phrases(text, POLITENESS)),
        "therapy_speak": per100(count_phrases(text, THERAPY_SPEAK)),
    }
    lexicon = _empath()
    if lexicon is not None:
        grams = words + [f"{a}_{b}" for a, b in zip(words, words[1:])]  # Empath has a few two-word terms
        out.update({cat: per100(sum(g in terms for g in grams)) for cat, terms in lexicon.items()})
    vader = _vader()
    if vader is not None:
        out["valence"] = float(vader.polarity_scores(text)["compound"])
    return out


def corpus_metrics(turns: Sequence[str]) -> dict[str, list[float]]:
    """metric -> its value on each turn (empty turns are skipped: they carry no language)."""
    rows = [turn_metrics(t) for t in turns if tokens(t)]
    return {m: [r[m] for r in rows] for m in available_metrics()}


def compare(simulated: Sequence[str], real: dict[str, list[float]]) -> dict:
    """Each metric's simulated and real mean, SMD and KS distance, and the aggregate score."""
    sim = corpus_metrics(simulated)
    names = [m for m in METRICS if m in sim and real.get(m)]
    n_sim = len(sim[names[0]]) if names else 0
    out = {"turns": {"simulated": n_sim, "real": len(real[names[0]]) if names else 0}, "metrics": {}, "score": None}
    if n_sim == 0:
        return out
    for m in names:
        ks = ks_statistic(sim[m], real[m])
        out["metrics"][m] = {
            "simulated": float(np.mean(sim[m])), "real": float(np.mean(real[m])),
            "smd": standardized_mean_difference(sim[m], real[m]), "distance": ks, "values": sim[m],
        }
    out["score"] = 100.0 * (1.0 - float(np.mean([v["distance"] for v in out["metrics"].values()])))
    return out


# ------------------------------------------------------------------ the real-client reference


def reference_path() -> Path:
    return Path(str(resources.files("eeyore.eval") / "data" / "real_client_metrics.json"))


def reference_from_profiles(path: str | Path) -> dict:
    """Per-turn metrics of the real client turns of every conversation in a profiles file."""
    from eeyore.profile import load_profiles

    turns = [t for p in load_profiles(path) for t in p.client_turns()]
    if not turns:
        raise ValueError(f"{path}: no profile has a conversation with client (assistant) turns")
    return {"source": Path(path).name, "turns": len(turns), "metrics": corpus_metrics(turns)}


def load_reference(path: str | Path | None = None) -> dict:
    """The real-client reference: None -> the one shipped (the 12 real test conversations);
    a profiles file -> computed from its conversations; a saved reference file -> read."""
    if path is None:
        return json.loads(reference_path().read_text())
    data = json.loads(Path(path).read_text())
    return data if isinstance(data, dict) and "metrics" in data else reference_from_profiles(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eeyore.eval.authenticity",
        description="Compute the real-client reference statistics (per-turn metrics of the client turns) "
                    "from a profiles file with conversations.",
    )
    parser.add_argument("profiles", help="profiles JSON whose records carry real `conversation`s")
    parser.add_argument("--out", default=str(reference_path()),
                        help="where to write the reference (default: the copy shipped with the package)")
    args = parser.parse_args(argv)
    ref = reference_from_profiles(args.profiles)
    Path(args.out).write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {ref['turns']} real client turns x {len(ref['metrics'])} metrics to {args.out}")


if __name__ == "__main__":
    main()
