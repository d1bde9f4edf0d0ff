"""`mergesafe demo --quick` end to end through the command line (real stages, sweep and report)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mergesafe.cli.main import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGESAFE_CACHE", str(root / "cache"))  # a cold cache: the whole pipeline runs
    try:
        result = CliRunner().invoke(app, ["demo", "--out", str(root / "out"), "--quick", "--seed", "0"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "out", result.output


def test_summary_shape_and_ranges(quick_demo):
    out, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"pre", "post", "recommended", "seconds"}
    for name in ("pre", "post"):
        assert set(summary[name]) == {"asr", "task", "over_refusal"}
    assert set(summary["recommended"]) == {"method", "weight", "asr", "task", "over_refusal"}
    for part in ("pre", "post", "recommended"):
        for key in ("asr", "task", "over_refusal"):
            value = summary[part][key]
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (part, key, value)
    assert summary["recommended"]["method"] in {"pre", "post", "linear", "slerp", "ties", "dare_linear"}
    assert 0.0 <= summary["recommended"]["weight"] <= 1.0
    assert summary["seconds"] > 0  # wall time is a benchmark figure, not a test (the machine is shared)


def test_outputs_agree_with_each_other(quick_demo):
    out, printed = quick_demo
    for name in ("results.jsonl", "report.html", "recommendation.json", "frontier.png",
                 "data/harmful_heldout.jsonl", "data/over_refusal.jsonl", "data/capitals_heldout.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"pre", "post", "linear", "slerp", "ties", "dare_linear"} <= methods
    summary = json.loads((out / "summary.json").read_text())
    pre = next(r for r in rows if r["method"] == "pre")
    assert summary["pre"]["asr"] == pytest.approx(pre["safety"]["harmful_heldout"]["asr"])
    assert summary["pre"]["task"] == pytest.approx(pre["task"]["capitals_heldout"]["score"])
    rec = json.loads((out / "recommendation.json").read_text())
    assert (rec["method"], rec["weight"]) == (summary["recommended"]["method"],
                                              summary["recommended"]["weight"])
    assert "recommended" in printed and "dare_linear" in printed
