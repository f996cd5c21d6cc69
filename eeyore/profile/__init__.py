"""The client profile: the one schema every layer reads (training data, serving, evaluation, studio).

How to read this package:
  - `schema.py`: field names and their order, the label scales (symptom severity, distortion,
    depression / ideation severity, resistance), `Profile`, `Trait`, `traits(profile)` and
    `json_schema()` (the schema as JSON Schema, for models asked to fill a profile in).
  - `validate.py`: `profile_errors(record)` (every broken field, one entry each), `validate_profile`
    (raises ProfileError), `load_profiles(path)` and the shipped `sample_profiles.json`.
  - `render.py`: `render_system_prompt(profile, style)` (training and evaluation styles) and
    `parse_system_prompt(prompt)`, its inverse for the training style.
It imports nothing else from eeyore: it sits at the bottom of the layers with the model.
"""
from .render import HEADER, STYLES, TASK, parse_system_prompt, profile_lines, render_system_prompt
from .schema import (
    DEMOGRAPHIC_FIELDS, DEPRESSION, DEPRESSION_LEVELS, DISTORTION_LEVELS, DISTORTION_NAMES, DISTORTIONS, FIELDS,
    HOMICIDAL, IDEATION_LEVELS, LEVEL_SCALES, LEVELS, RESISTANCE, RESISTANCE_LEVELS, SEVERITY_FIELDS, SUICIDAL,
    SYMPTOM_LEVELS, SYMPTOM_NAMES, SYMPTOMS, UNKNOWN, Profile, ProfileError, Trait, is_exhibited, known_value,
    FIELD_NOTES, json_schema, read_level, severity_level, traits,
)
from .validate import load_profiles, profile_errors, profile_label, sample_profiles_path, validate_profile

__all__ = [
    "DEMOGRAPHIC_FIELDS", "DEPRESSION", "DEPRESSION_LEVELS", "DISTORTION_LEVELS", "DISTORTION_NAMES", "DISTORTIONS",
    "FIELD_NOTES", "FIELDS", "HEADER", "HOMICIDAL", "IDEATION_LEVELS", "LEVEL_SCALES", "LEVELS", "RESISTANCE", "RESISTANCE_LEVELS",
    "SEVERITY_FIELDS", "STYLES", "SUICIDAL", "SYMPTOM_LEVELS", "SYMPTOM_NAMES", "SYMPTOMS", "TASK",
    "UNKNOWN", "Profile", "ProfileError", "Trait", "is_exhibited", "json_schema", "known_value", "load_profiles",
    "parse_system_prompt", "profile_errors", "profile_label", "profile_lines", "read_level",
    "render_system_prompt", "sample_profiles_path", "severity_level", "traits", "validate_profile",
]
