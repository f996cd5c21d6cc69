"""Per-field agreement of extracted profiles with gold ones, against values counted by hand."""
from __future__ import annotations

import copy
import json

import pytest

from eeyore.data.agreement import agreement, main
from eeyore.profile import DISTORTIONS, SYMPTOMS, sample_profiles_path

SAMPLES = json.loads(sample_profiles_path().read_text())


def _rows(predicted, gold):
    rows, missing = agreement(predicted, gold)
    return {(r.field.split(" (")[0], r.metric): r for r in rows}, missing


def test_hand_counted_disagreements():
    gold = copy.deepcopy(SAMPLES[0]["profile"])
    pred = copy.deepcopy(gold)
    symptoms = gold[SYMPTOMS]
    moderate = next(k for k, v in symptoms.items() if v == "Moderate")
    absent = next(k for k, v in symptoms.items() if v == "Not exhibited")
    pred[SYMPTOMS][moderate] = "3-Severe"  # one level off: not exact, within one, still present
    pred[SYMPTOMS][absent] = "Severe"  # three levels off and a false presence
    on = next(k for k, v in gold[DISTORTIONS].items() if v == "Exhibited")
    pred[DISTORTIONS][on] = "Not exhibited"  # a missed distortion
    pred["gender"] = "male"
    pred["age"] = gold["age"].upper() + "."  # case and a full stop do not matter
    pred["name"] = "unknown"  # gold: Cannot be identified: both unknown
    pred["depression severity"] = "Mild Depression - a different reason"  # gold: Moderate Depression ...
    assert gold["depression severity"].startswith("Moderate Depression")

    rows, missing = _rows({"a": pred, "extra": pred}, {"a": gold, "lost": gold})
    assert missing == 1
    assert rows[("symptom severity", "exact")].value == pytest.approx(16 / 18)
    assert rows[("symptom severity", "within one")].value == pytest.approx(17 / 18)
    assert rows[("symptom severity", "exact")].n == 18
    present = sum(v != "Not exhibited" for v in symptoms.values())
    precision, recall = present / (present + 1), 1.0
    assert rows[("symptom presence", "F1")].value == pytest.approx(2 * precision * recall / (precision + recall))
    shown = sum(v == "Exhibited" for v in gold[DISTORTIONS].values())
    recall = (shown - 1) / shown
    assert rows[("distortion presence", "F1")].value == pytest.approx(2 * recall / (1 + recall))
    assert rows[("depression severity", "exact")].value == 0 and rows[("depression severity", "within one")].value == 1
    assert rows[("gender", "accuracy")].value == 0
    assert rows[("age", "accuracy")].value == rows[("name", "accuracy")].value == 1


def test_unreadable_gold_is_left_out_and_unreadable_prediction_is_a_miss():
    gold, pred = copy.deepcopy(SAMPLES[0]["profile"]), copy.deepcopy(SAMPLES[0]["profile"])
    gold["resistance toward the support"] = "varies"
    pred["suicidal ideation severity"] = "hard to say"
    rows, _ = _rows({"a": pred}, {"a": gold})
    assert rows[("resistance toward the support", "exact")].n == 0
    assert rows[("resistance toward the support", "exact")].value is None
    assert rows[("suicidal ideation severity", "exact")].value == 0
    assert rows[("suicidal ideation severity", "within one")].value == 0


def test_cli_names_an_invalid_profile_in_one_line(tmp_path, capsys):
    bad = tmp_path / "pred.jsonl"
    record = copy.deepcopy(SAMPLES[0])
    del record["profile"]["age"]
    bad.write_text(json.dumps(record) + "\n")
    assert main([str(bad), str(sample_profiles_path())]) == 2
    err = capsys.readouterr().err
    assert "pred.jsonl line 1: missing field 'profile.age'" in err and err.count("\n") == 1


def test_nothing_to_compare_scores_nothing():
    rows, missing = agreement({}, {"a": SAMPLES[0]["profile"]})
    assert missing == 1 and all(r.value is None and r.n == 0 for r in rows)
