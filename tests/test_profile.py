"""The profile schema: validation field by field, the two system-prompt renderings, parsing a
rendered prompt back, and the trait plan."""
import copy
import json

import pytest

from eeyore.profile import (
    DISTORTIONS, SYMPTOMS, ProfileError, load_profiles, parse_system_prompt, profile_errors, read_level,
    render_system_prompt, sample_profiles_path, severity_level, traits, validate_profile,
)

from shared_data import SHARED_PROFILES as SHARED, needs_shared


@needs_shared
def test_train_style_reproduces_all_12_stored_system_prompts():
    profiles = load_profiles(SHARED)
    assert len(profiles) == 12
    for p in profiles:
        assert p.conversation[0]["role"] == "system"
        assert render_system_prompt(p, "train") == p.conversation[0]["content"], p.label


@needs_shared
def test_eval_style_matches_the_reference_variant_by_hand():
    p = load_profiles(SHARED)[1]  # labels with number prefixes, symptoms of three levels
    expected = (
        "You will act as a help-seeker struggling with negative emotions in a conversation with someone who is "
        "listening to you.\nYOUR PROFILE:\n"
        "- age: 0~24\n"
        "- occupation: student\n"
        "- situation of the client: the client is feeling anxious about an upcoming college test, believing that "
        "their future depends on doing well. this anxiety is interfering with their sleep schedule.\n"
        "- resistance toward the support: low\n"  # counseling history "N/A" dropped
        "- symptom severity\n"
        "  - anxiety, agitation, or restlessness: severe\n"
        "  - sleep disturbances, including insomnia or sleeping too much: moderate\n"
        "  - trouble thinking, concentrating, making decisions, and remembering things: moderate\n"
        "  - feelings of sadness, tearfulness, emptiness, or hopelessness: mild\n"
        "  - feelings of worthlessness or guilt, fixating on past failures or self-blame: mild\n"
        "- cognition distortion exhibition\n"
        "  - overgeneralizing: exhibited\n"
        "  - catastrophic thinking: exhibited\n"
        "- depression severity: 2-Mild Depression. The client is experiencing anxiety and sleep disturbances, but "
        "there is no indication of severe depression.\n"
        "- suicidal ideation severity: No suicidal ideation\n"
        "- homicidal ideation severity: No homicidal ideation\n"
        "\nYOUR TASK:\nAs the client, your role is to continue the conversation by responding naturally to the "
        "supporter, reflecting the characteristics outlined in your profile."
    )
    assert render_system_prompt(p, "eval") == expected


@needs_shared
def test_traits_of_a_real_profile():
    p = load_profiles(SHARED)[1]
    got = [(t.category, t.name) for t in traits(p)]
    assert got == [
        ("mild", "feelings of sadness, tearfulness, emptiness, or hopelessness"),
        ("moderate", "sleep disturbances, including insomnia or sleeping too much"),
        ("severe", "anxiety, agitation, or restlessness"),
        ("mild", "feelings of worthlessness or guilt, fixating on past failures or self-blame"),
        ("moderate", "trouble thinking, concentrating, making decisions, and remembering things"),
        ("distortion", "overgeneralizing"),
        ("distortion", "catastrophic thinking"),
        ("overall", p.fields["depression severity"]),
    ]


def test_sample_profiles_are_valid_and_self_consistent():
    profiles = load_profiles()  # the shipped samples
    assert len(profiles) >= 4
    for p in profiles:
        assert p.cognitive is not None and p.client_turns()
        assert render_system_prompt(p, "train") == p.conversation[0]["content"]
        assert {t.category for t in traits(p)} >= {"distortion", "overall"}


def test_severity_labels():
    assert severity_level("3-Moderate") == "moderate"
    assert severity_level(" Severe ") == "severe"
    assert severity_level("1-Not exhibited") is None
    with pytest.raises(ValueError, match="unknown severity 'Sometimes'"):
        severity_level("Sometimes")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["profile"].pop("age"), "profile 0 (eeyore-sample grief-nurse): missing field 'profile.age'"),
    (lambda r: r["profile"].update({"martial status": "x"}), "unknown field 'profile.martial status'"),
    (lambda r: r["profile"]["symptom severity"].update({"greater impulsivity": "Sometimes"}),
     "field 'profile.symptom severity.greater impulsivity': unknown severity 'Sometimes'"),
    (lambda r: r["profile"]["cognition distortion exhibition"].update({"personalization": "Yes"}),
     "'profile.cognition distortion exhibition.personalization': expected Exhibited or Not exhibited"),
    (lambda r: r["profile"].update({"gender": 3}), "field 'profile.gender' must be a string, got int"),
    (lambda r: r["cognitive profile"]["cognitive_models"][1].pop("emotion"),
     "'cognitive profile.cognitive_models[1].emotion' must be a string"),
    (lambda r: r["conversation"].append({"role": "client", "content": "hi"}), "'conversation[9]' must have role"),
])
def test_validation_errors_name_the_profile_and_field(edit, message):
    record = copy.deepcopy(json.loads(sample_profiles_path().read_text())[0])
    edit(record)
    with pytest.raises(ProfileError, match=None) as err:
        validate_profile(record, 0, where="samples.json")
    assert message in str(err.value) and str(err.value).startswith("samples.json: profile 0")


def test_load_profiles_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="profiles file not found"):
        load_profiles(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: not valid JSON"):
        load_profiles(bad)
    bad.write_text("[]")
    with pytest.raises(ProfileError, match="non-empty JSON list"):
        load_profiles(bad)


def test_unknown_style_is_an_error():
    with pytest.raises(ValueError, match="unknown prompt style 'chat'"):
        render_system_prompt(load_profiles()[0], "chat")


@needs_shared
def test_every_shared_profile_validates_and_its_prompt_reads_back():
    records = json.loads(SHARED.read_text())
    for i, record in enumerate(records):
        assert profile_errors(record) == [], i
        prompt = record["conversation"][0]["content"]
        fields = parse_system_prompt(prompt)
        assert profile_errors({"profile": fields}) == []
        assert render_system_prompt(fields) == prompt
        # what the rendering keeps comes back unchanged; what it leaves out comes back as "unknown"
        for name, value in record["profile"].items():
            if isinstance(value, str) and "cannot be identified" not in value.lower():
                assert fields[name] == value, (i, name)


def test_broken_profile_names_every_broken_field_once():
    record = copy.deepcopy(json.loads(sample_profiles_path().read_text())[0])
    fields = record["profile"]
    del fields["age"]
    fields["gender"] = ["Female"]
    fields["martial status"] = "Single"
    fields[SYMPTOMS]["greater impulsivity"] = "Sometimes"
    del fields[SYMPTOMS]["increased use of alcohol or drugs"]
    fields[SYMPTOMS]["feeling blue"] = "Mild"
    fields[DISTORTIONS]["personalization"] = "Yes"
    record["evidence"] = {"gender": 1, "situation of the client": "my dad died", "hair colour": "brown"}
    errors = profile_errors(record)
    expected = [
        "unknown field 'profile.martial status'",
        "missing field 'profile.age'",
        "field 'profile.gender' must be a string, got list",
        "field 'profile.symptom severity.greater impulsivity': unknown severity 'Sometimes'",
        "missing entry 'profile.symptom severity.increased use of alcohol or drugs'",
        "unknown entry 'profile.symptom severity.feeling blue'",
        "field 'profile.cognition distortion exhibition.personalization': expected Exhibited or Not exhibited",
        "field 'evidence.gender' must be a string",
        "unknown field 'evidence.hair colour'",
    ]
    assert len(errors) == len(expected), errors
    for want in expected:
        assert sum(want in e for e in errors) == 1, (want, errors)
    with pytest.raises(ProfileError) as err:
        validate_profile(record, 0, where="samples.json")
    assert err.value.errors == errors and "\n" not in str(err.value)


def test_read_level_keeps_the_rank_spelling():
    levels = ("Minimal", "Mild", "Moderate", "Severe")
    assert read_level("3-Moderate Depression", levels) == (2, True)
    assert read_level("Mild Depression - the client is sad", levels) == (1, False)
    assert read_level("Not exhibited", ("Not exhibited", "Exhibited")) == (0, False)
    assert read_level("Sometimes", levels) is None and read_level(3, levels) is None


def test_parse_rejects_lines_it_cannot_read():
    prompt = render_system_prompt(load_profiles()[0])
    with pytest.raises(ValueError, match="cannot read profile line '- hair colour: brown'"):
        parse_system_prompt(prompt.replace("YOUR PROFILE:\n", "YOUR PROFILE:\n- hair colour: brown\n"))
