"""Authenticity metrics on fixed texts (hand-computed), against the lexicon packages' own
scoring, and on the real conversations; the statistics they are compared with."""
import json

import numpy as np
import pytest

from eeyore.eval import authenticity as A
from eeyore.eval.stats import ks_statistic, mean_ci, standardized_mean_difference

from shared_data import SHARED_PROFILES as SHARED, needs_shared


def test_rates_and_diversity_by_hand():
    m = A.turn_metrics("I always feel like nothing works, and I feel so tired.")
    # i always feel like nothing works and i feel so tired: 11 words, 9 types
    assert m["words"] == 11
    assert m["lexical_diversity"] == pytest.approx(9 / 11)
    assert m["first_person"] == pytest.approx(100 * 2 / 11)
    assert m["absolutist"] == pytest.approx(100 * 2 / 11)  # always, nothing
    assert m["markdown"] == 0.0 and m["advice"] == 0.0 and m["politeness"] == 0.0


def test_contractions_and_curly_apostrophes_count_as_first_person():
    m = A.turn_metrics("I’m done. Im not sure myself")
    assert A.tokens("I’m done. Im not sure myself") == ["i'm", "done", "im", "not", "sure", "myself"]
    assert m["first_person"] == pytest.approx(100 * 3 / 6)


def test_mattr_uses_a_moving_window_on_long_turns():
    words = [f"w{i}" for i in range(24)] + ["w0", "w1"]  # two windows of 25, each with 24 types
    assert A.mattr(words) == pytest.approx(24 / 25)
    assert A.mattr(["a", "b", "a"]) == pytest.approx(2 / 3)
    assert A.mattr([]) == 0.0


def test_assistant_style_markers_by_hand():
    assert A.turn_metrics("Here are some tips:\n1. Sleep more\n2. Eat well")["markdown"] == 1.0
    assert A.turn_metrics("That was **really** hard")["markdown"] == 1.0
    assert A.turn_metrics("- not a list, just a dash-y thought")["markdown"] == 1.0
    assert A.turn_metrics("i feel - like - nothing")["markdown"] == 0.0
    # you should | try to | consider: 3 in 8 words
    assert A.turn_metrics("You should try to rest. Consider a walk.")["advice"] == pytest.approx(100 * 3 / 8)
    # thank you | thanks: 2 in 6 words
    assert A.turn_metrics("Thank you so much, thanks again!")["politeness"] == pytest.approx(100 * 2 / 6)
    # boundaries | self-compassion: 2 in 10 words
    m = A.turn_metrics("I need to set boundaries and work on self-compassion.")
    assert m["therapy_speak"] == pytest.approx(100 * 2 / 10)


def test_lexicon_rates_agree_with_the_packages_own_scoring():
    empath = pytest.importorskip("empath")
    vader = pytest.importorskip("vaderSentiment.vaderSentiment")
    text = "i am so sad and alone and afraid and i cry every night because of the pain and grief"
    ours = A.turn_metrics(text)
    n = len(text.split())
    theirs = empath.Empath().analyze(text, categories=list(A.EMPATH_CATEGORIES.values()))
    for name, cat in A.EMPATH_CATEGORIES.items():
        assert ours[name] == pytest.approx(100 * theirs[cat] / n), name
    assert ours["negative_emotion"] > 0 and ours["sadness"] > 0
    assert ours["valence"] == vader.SentimentIntensityAnalyzer().polarity_scores(text)["compound"] < 0


def test_statistics_by_hand():
    assert ks_statistic([1, 2, 3], [2, 3, 4]) == pytest.approx(1 / 3)
    assert ks_statistic([1, 2], [5, 6]) == 1.0
    assert ks_statistic([1, 2, 3], [3, 2, 1]) == 0.0
    assert standardized_mean_difference([1, 2, 3], [2, 3, 4]) == pytest.approx(-1.0)  # sd 1 each
    assert standardized_mean_difference([1, 1], [1, 1]) == 0.0
    assert standardized_mean_difference([1, 1], [2, 2]) is None
    s = mean_ci([2, 4, 4, 5])
    assert s["mean"] == 3.75 and s["n"] == 4 and 2 <= s["ci"][0] < 3.75 < s["ci"][1] <= 5
    assert mean_ci([3, 3, 3])["ci"] == [3.0, 3.0]
    assert mean_ci([]) == {"mean": None, "ci": [None, None], "n": 0}
    assert mean_ci([1, 5, 2, 4]) == mean_ci([1, 5, 2, 4])  # seeded: reproducible


@needs_shared
def test_shipped_reference_matches_the_real_conversations():
    pytest.importorskip("empath")
    pytest.importorskip("vaderSentiment")
    shipped = A.load_reference()
    fresh = A.reference_from_profiles(SHARED)
    assert shipped["turns"] == fresh["turns"] == 86
    assert set(shipped["metrics"]) == set(A.METRICS)
    for m in A.METRICS:
        np.testing.assert_allclose(shipped["metrics"][m], fresh["metrics"][m], err_msg=m)


def test_real_clients_look_like_the_literature():
    real = A.load_reference()["metrics"]
    # Real clients talk about themselves a lot and never format their messages.
    assert np.mean(real["first_person"]) > 8
    assert np.mean(real["markdown"]) == 0.0 and np.mean(real["therapy_speak"]) == 0.0


@needs_shared
def test_compare_real_with_itself_is_perfect_and_assistant_speech_is_not():
    from eeyore.profile import load_profiles

    real = A.load_reference()
    turns = [t for p in load_profiles(SHARED) for t in p.client_turns()]
    same = A.compare(turns, real["metrics"])
    assert same["score"] == pytest.approx(100.0)
    assert all(v["distance"] == 0.0 for v in same["metrics"].values())
    assistant = [
        "Thank you for asking. Here are a few things that help me:\n1. **Self-care**: I try to set boundaries.\n"
        "2. **Mindfulness**: you should consider it too. It's important to validate your feelings.",
    ] * 5
    far = A.compare(assistant, real["metrics"])
    assert far["score"] < 60
    assert far["metrics"]["markdown"]["distance"] == 1.0 and far["metrics"]["markdown"]["simulated"] == 1.0
    assert far["metrics"]["therapy_speak"]["smd"] is None  # real clients: zero spread, different mean
    assert far["turns"] == {"simulated": 5, "real": 86}


def test_empty_simulation_has_no_score():
    out = A.compare([], A.load_reference()["metrics"])
    assert out["score"] is None and out["turns"]["simulated"] == 0


def test_reference_cli_writes_a_reference_that_loads(tmp_path):
    from eeyore.profile import sample_profiles_path

    out = tmp_path / "ref.json"
    A.main([str(sample_profiles_path()), "--out", str(out)])
    ref = A.load_reference(out)
    assert ref["turns"] == sum(len(p["conversation"]) // 2 for p in json.loads(sample_profiles_path().read_text()))
    assert A.load_reference(sample_profiles_path())["metrics"] == ref["metrics"]
