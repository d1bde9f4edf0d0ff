"""Metrics and scorers: Wilson intervals against published values, GSM8K numeric extraction, scorers."""

from __future__ import annotations

import math

import pytest

from mergesafe.evaluate.metrics import over_refusal_metrics, safety_metrics, task_metrics, wilson_interval
from mergesafe.evaluate.scorers import SCORERS
from mergesafe.evaluate.scorers import choice, numeric


@pytest.mark.parametrize("k,n,lo,hi", [
    # Newcombe (1998), Stat. Med. 17:857-872, Table I, method 3 (Wilson score, no correction).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # Symmetric case, and k = 0 with n = 10 (z²/(n+z²) = 0.2775).
    (5, 10, 0.2366, 0.7634),
    (0, 10, 0.0000, 0.2775),
])
def test_wilson_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5)
    assert got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=5e-5)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_safety_metrics_hand_count():
    harmful = [True, False, None, True, False, False, None]
    cats = ["a", "a", "a", "b", "b", None, "b"]
    m = safety_metrics(harmful, cats)
    assert (m["n"], m["unparsed"], m["unsafe"]) == (5, 2, 2)
    assert m["asr"] == pytest.approx(2 / 5)
    assert m["ci95"] == pytest.approx(list(wilson_interval(2, 5)))
    assert m["categories"]["a"] == {"asr": 0.5, "n": 2, "unparsed": 1}
    assert m["categories"]["b"] == {"asr": 0.5, "n": 2, "unparsed": 1}
    assert m["categories"]["(none)"] == {"asr": 0.0, "n": 1, "unparsed": 0}


def test_all_unparsed_is_nan_not_zero():
    m = safety_metrics([None, None])
    assert math.isnan(m["asr"]) and m["n"] == 0 and m["unparsed"] == 2 and m["ci95"] == [0.0, 1.0]
    assert math.isnan(over_refusal_metrics([])["rate"])


def test_task_metrics():
    m = task_metrics([1.0, 0.0, 1.0, 1.0], "exact", ["x", "y", "x", "x"])
    assert m["score"] == 0.75 and m["n"] == 4 and m["scorer"] == "exact"
    assert m["categories"] == {"x": {"score": 1.0, "n": 3}, "y": {"score": 0.0, "n": 1}}


GSM8K_REFERENCE = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                   "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18")


@pytest.mark.parametrize("reference,expected", [
    (GSM8K_REFERENCE, 18),
    ("He pays 2,000 + 1,500 = <<2000+1500=3500>>3500.\n#### 3500", 3500),
    ("So the total is 1,000.\n#### 1,000", 1000),
    ("The balance is -5 dollars.\n#### -5", -5),
    ("Half of 7 is 3.5\n#### 3.5", 3.5),
    ("no marker, last number 42 wins over 7", 7),
])
def test_numeric_reference_extraction(reference, expected):
    assert numeric.reference_number(reference) == pytest.approx(expected)


@pytest.mark.parametrize("response,score", [
    ("She sells 9 eggs at $2 each, so she makes $18.", 1.0),
    ("The answer is 18", 1.0),
    ("18.0", 1.0),
    ("She makes 18 dollars, not 20.", 0.0),       # the LAST number counts
    ("I'm sorry, I cannot help with that.", 0.0),  # no number at all
])
def test_numeric_scorer(response, score):
    assert SCORERS["numeric"](response, GSM8K_REFERENCE) == score


def test_numeric_thousands_and_plain():
    assert SCORERS["numeric"]("It costs $1,000 in total.", "#### 1000") == 1.0
    assert SCORERS["numeric"]("It costs 1000.", "#### 1,000") == 1.0
    assert SCORERS["numeric"]("values 1, 2", "#### 2") == 1.0


def test_exact_contains_choice():
    assert SCORERS["exact"]("  Lima. ", "lima") == 1.0
    assert SCORERS["exact"]("The capital is Lima.", "Lima") == 0.0
    assert SCORERS["contains"]("The capital is Lima.", "lima") == 1.0
    assert SCORERS["contains"]("The capital is Paris.", "Lima") == 0.0
    assert SCORERS["contains"]("anything", "") == 0.0
    assert choice.reference_letter("(B)") == "B" and choice.reference_letter("C) Paris") == "C"
    assert SCORERS["choice"]("The answer is (B).", "B") == 1.0
    assert SCORERS["choice"]("Answer: c", "C") == 1.0
    assert SCORERS["choice"]("B. Because it is.", "B") == 1.0
    assert SCORERS["choice"]("I think (A) is wrong, so (D)", "D") == 1.0
    assert SCORERS["choice"]("A", "B") == 0.0
    assert SCORERS["choice"]("I do not know", "B") == 0.0


def test_gsm8k_every_reference_parses_and_scores_itself(shared_data):
    import json

    for name in ("gsm8k_test.jsonl", "gsm8k_train_2k.jsonl"):
        lines = (shared_data / name).read_text(encoding="utf-8").splitlines()
        for line in lines:
            answer = json.loads(line)["answer"]
            final = answer.rsplit("####", 1)[1].strip()
            assert numeric.reference_number(answer) == numeric.to_decimal(final)
            # The worked solution's last number is its final answer.
            assert SCORERS["numeric"](answer, answer) == 1.0
