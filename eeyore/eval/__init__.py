"""Evaluation of simulated clients: profile adherence (interview + LLM judge), linguistic
authenticity, the Roleplay-doh and Patient-Psi baselines, and reports. See docs/evaluation.md."""
from eeyore.eval.profiles import Profile, ProfileError, Trait, load_profiles, render_system_prompt, traits

__all__ = ["Profile", "ProfileError", "Trait", "load_profiles", "render_system_prompt", "traits"]
