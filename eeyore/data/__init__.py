"""Data building: the tools that turn conversations into training data.

How to read this package:
  - `perturb.py` + `make_preferences.py`: round-1 DPO pairs (the real client reply against one
    generated under a perturbed profile).
Everything here reads and writes profiles through `eeyore.profile`; the trainers never import it.
"""
