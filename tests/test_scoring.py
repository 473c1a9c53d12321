"""Scores on hand-computed cases (SPEC section 1)."""

import pytest

from badit_exp.evaluation.scoring import exact_match, normalize, rouge_l, summary_score


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat sat on the mat") = 3 -> P = 1, R = 1/2, F = 2/3
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert rouge_l("dog", ["the cat"]) == 0.0


def test_rouge_l_uses_stemming_and_best_reference():
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)
    assert rouge_l("POS", ["NEG", "pos"]) == pytest.approx(100.0)


def test_exact_match_normalisation():
    assert normalize("  The  Cat, sat!\n") == "the cat sat"
    assert exact_match("The Cat!", ["the  cat"]) == 100.0
    assert exact_match("cat", ["dog", " Cat. "]) == 100.0
    assert exact_match("cats", ["cat"]) == 0.0


def test_summary_score_mapping():
    s = {"rougeL": 40.0, "exact_match": 0.0}
    assert summary_score("t1", s, "rougeL", ["t1"]) == 40.0
    assert summary_score("t1", s, "table4", ["t1"]) == 0.0
    assert summary_score("t2", s, "table4", ["t1"]) == 40.0
