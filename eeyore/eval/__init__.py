"""Evaluation of simulated clients: profile adherence (interview + LLM judge), linguistic
authenticity, the Roleplay-doh and Patient-Psi baselines, and reports. See docs/evaluation.md.
Profiles themselves (schema, rendering, traits) live in `eeyore.profile`.

How to read this package: `__main__.py` (the command line) → `runner.py` (sessions, the cache of
finished ones, results.json) → `interview.py` and `conversation.py` (what the simulated client
is asked) → `judge.py` (the 1-5 score) → `authenticity.py` and `stats.py` (the distances to real
clients' speech) → `report.py` (Markdown and charts); `baselines.py` holds the two prompting
baselines."""
