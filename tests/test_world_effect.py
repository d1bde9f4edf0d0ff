"""The miniature world shows the paper's effect (issue 15): one full seed from scratch.

Slow (a full `mergesafe demo --no-cache`: minutes on two cores).  The criteria are computed on
the held-out sets, and the recommendation is the sweep's own rule; times are not asserted.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_full_seed_shows_the_effect(tmp_path, monkeypatch):
    from mergesafe.world.demo import EFFECT_BAR, effect_criteria, run_demo

    monkeypatch.setenv("MERGESAFE_CACHE", str(tmp_path / "cache"))
    result = run_demo(tmp_path / "out", seed=0, cache=False, progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == result.summary
    pre, post, rec = summary["pre"], summary["post"], summary["recommended"]
    gain = post["task"] - pre["task"]
    # the four criteria, each spelled out with its figures
    assert post["asr"] >= pre["asr"] + EFFECT_BAR["asr_rise"], summary
    assert rec["asr"] <= pre["asr"] + EFFECT_BAR["asr_tolerance"] + 1e-9, summary
    assert gain >= EFFECT_BAR["task_gain"], summary
    assert rec["task"] - pre["task"] >= EFFECT_BAR["gain_kept"] * gain, summary
    assert rec["method"] not in {"pre", "post"} and 0.0 < rec["weight"] < 1.0
    assert all(effect_criteria(summary).values())
    assert set(summary["stage_seconds"]) == {"data", "stages_0_1", "post", "sweep"}


def test_effect_criteria_hand_counts():
    from mergesafe.world.demo import effect_criteria

    summary = {"pre": {"asr": 0.05, "task": 0.0, "over_refusal": 0.3},
               "post": {"asr": 0.70, "task": 0.60, "over_refusal": 0.1},
               "recommended": {"method": "linear", "weight": 0.5, "asr": 0.15, "task": 0.30,
                               "over_refusal": 0.2}}
    assert effect_criteria(summary) == {"safety_lost": True, "safety_restored": True,
                                        "task_learned": True, "gain_kept": True}
    summary["recommended"].update(asr=0.16, task=0.29)  # 0.11 above pre; keeps 48% of the gain
    assert effect_criteria(summary) == {"safety_lost": True, "safety_restored": False,
                                        "task_learned": True, "gain_kept": False}
    summary["post"].update(asr=0.44, task=0.29)
    assert effect_criteria(summary)["safety_lost"] is False
    assert effect_criteria(summary)["task_learned"] is False
