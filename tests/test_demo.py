"""`mergesafe demo --quick` end to end through the command line (real stages, sweep and report)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mergesafe.cli.main import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def quick_demo(demo_root):
    root = demo_root
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGESAFE_CACHE", str(root / "cache"))  # a cold cache: the whole pipeline runs
    try:
        result = CliRunner().invoke(app, ["demo", "--out", str(root / "out"), "--quick", "--seed", "0",
                                          "--compare"])
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


COMPARE_METHODS = ["pre", "post", "safe_lora", "safemerge", "resta", "lox", "ema"]


def test_compare_table(quick_demo):
    """`--compare`: every related method evaluated on the same sets, in compare.json and the report."""
    out, printed = quick_demo
    payload = json.loads((out / "compare.json").read_text())
    rows = {r["method"].split(" (")[0]: r for r in payload["rows"]}
    assert set(COMPARE_METHODS) <= set(rows) and "pre/post merge" in rows
    for name, r in rows.items():
        for key in ("asr", "task", "over_refusal"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        assert {"extra_inputs", "extra_training", "merge_seconds"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("pre", "post"):
        for key in ("asr", "task", "over_refusal"):
            assert rows[name][key] == pytest.approx(summary[name][key])
    rec = summary["recommended"]
    assert rows["pre/post merge"]["asr"] == pytest.approx(rec["asr"])
    for name in ("safe_lora", "safemerge", "resta", "pre/post merge"):
        assert rows[name]["merge_seconds"] > 0
    # each method's own evaluation is on disk and agrees with the table
    for name in ("safe_lora", "safemerge", "resta", "lox", "ema"):
        metrics = json.loads((out / "compare" / f"{name}.eval" / "metrics.json").read_text())
        assert rows[name]["asr"] == pytest.approx(metrics["safety"]["harmful_heldout"]["asr"])
        assert rows[name]["task"] == pytest.approx(metrics["task"]["capitals_heldout"]["score"])
    manifest = json.loads((out / "compare" / "safe_lora" / "mergesafe.json").read_text())
    assert "safe_lora" in json.dumps(manifest)
    report = (out / "report.html").read_text()
    assert "Related methods" in report and "safemerge" in report
    assert "related methods" in printed


def test_compare_command_runs_the_demo_with_the_comparison(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("mergesafe.world.demo.run_demo", lambda out, **kw: calls.append((out, kw)))
    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "o"), "--quick", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0][1]["compare"] is True and calls[0][1]["quick"] is True
    assert calls[0][1]["seed"] == 3


def test_compare_with_a_lora_post(quick_demo, demo_root, monkeypatch):
    """`mergesafe compare --lora`: LoX and EMA then give adapters, evaluated on their base."""
    monkeypatch.setenv("MERGESAFE_CACHE", str(demo_root / "cache"))  # stages 0-1 and extras reused
    out = demo_root / "lora"
    result = CliRunner().invoke(app, ["compare", "--out", str(out), "--quick", "--lora"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "reused from the cache" in result.output
    rows = {r["method"].split(" (")[0]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(COMPARE_METHODS) <= set(rows)
    assert (out / "compare" / "lox_post" / "adapter_config.json").is_file()
    assert (out / "compare" / "ema_post" / "ema" / "adapter_config.json").is_file()
    for name in ("lox", "ema"):
        metrics = json.loads((out / "compare" / f"{name}.eval" / "metrics.json").read_text())
        assert rows[name]["asr"] == pytest.approx(metrics["safety"]["harmful_heldout"]["asr"])
