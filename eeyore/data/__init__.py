"""Data building: the tools that turn conversations into training data.

How to read this package:
  - `conversations.py`: reading conversations (any role names, any of .json/.jsonl/.parquet),
    naming them, and the append-only JSON-lines files that make every tool resumable.
  - `extract_profiles.py`: one LLM request per conversation for the client's whole profile,
    validated by `eeyore.profile`, retried with the errors quoted back, rejects kept with reasons.
  - `agreement.py`: extracted profiles against gold ones, field by field.
  - `build_sft.py` (+ `datacard.py`): SFT records whose system prompt is the rendered profile,
    filtered, with a data card.
  - `perturb.py` + `make_preferences.py`: round-1 DPO pairs (the real client reply against one
    generated under a perturbed profile).
Everything here reads and writes profiles through `eeyore.profile`; the trainers never import it.
See docs/data.md.
"""
