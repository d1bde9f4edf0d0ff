"""Per-set limits: `--limit N`, `--limit KIND=N`, `--limit SET=N` (issue 15: one N for every set is not enough)."""

from __future__ import annotations

import json

import pytest

from cli_helpers import expect_error, run_cli
from mergesafe.cli.options import parse_limits
from mergesafe.errors import UserError
from test_sweep import _write_sets


def test_parse_limits():
    assert parse_limits(None) == (None, {})
    assert parse_limits(["100", "over-refusal=50", "xstest=25"]) == (100, {"over-refusal": 50, "xstest": 25})
    assert parse_limits(["a=b=3"]) == (None, {"a=b": 3})  # the last '=' splits: set names may hold '='
    for bad in (["0"], ["x"], ["=3"], ["set=-1"], ["set="]):
        with pytest.raises(UserError, match="--limit"):
            parse_limits(bad)


def test_each_set_gets_its_own_limit(tmp_path, tiny_pre, capsys):
    sets = tmp_path / "sets"
    _write_sets(sets)  # harm: 5 rows, benign: 3 safe rows, task: 6 rows
    out = tmp_path / "out"
    code, _, err = run_cli(["eval", "--model", tiny_pre, "--out", out, "--safety", sets / "harm.jsonl",
                            "--over-refusal", sets / "benign.csv", "--task", sets / "task.jsonl",
                            "--scorer", "contains", "--max-new-tokens", 2, "--no-progress",
                            "--limit", 4, "--limit", "over-refusal=1", "--limit", "task=5", "--limit", "task=3"],
                           capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["safety"]["harm"]["n"] == 4  # the plain N
    assert metrics["over_refusal"]["benign"]["n"] == 1  # its kind's
    assert metrics["task"]["task"]["n"] == 3  # the last value of a repeated key wins
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 1 + 3

    out2 = tmp_path / "out2"
    code, _, err = run_cli(["eval", "--model", tiny_pre, "--out", out2, "--safety", sets / "harm.jsonl",
                            "--task", sets / "task.jsonl", "--scorer", "contains", "--max-new-tokens", 2,
                            "--no-progress", "--limit", "task=2", "--limit", "harm=1", "--limit", "safety=3"],
                           capsys)
    assert code == 0, err
    metrics = json.loads((out2 / "metrics.json").read_text())
    assert (metrics["safety"]["harm"]["n"], metrics["task"]["task"]["n"]) == (1, 2)  # a set's own wins


def test_a_limit_for_no_set_exits_2(tmp_path, tiny_pre, capsys):
    sets = tmp_path / "sets"
    _write_sets(sets)
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "o", "--safety", sets / "harm.jsonl",
                  "--limit", "xstest=5"], capsys, "--limit xstest=5", "no set named 'xstest'", "harm")
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "o", "--safety", sets / "harm.jsonl",
                  "--limit", "five"], capsys, "--limit", "positive integer")
    assert not (tmp_path / "o").exists()
