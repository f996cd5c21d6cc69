"""Evaluation of simulated clients: profile adherence (interview + LLM judge), linguistic
authenticity, the Roleplay-doh and Patient-Psi baselines, and reports. See docs/evaluation.md.
Profiles themselves (schema, rendering, traits) live in `eeyore.profile`."""
