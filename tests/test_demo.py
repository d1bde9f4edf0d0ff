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
    assert set(summary) == {"pre", "post", "recommended", "seconds", "stage_seconds"}
    # the quick test runs with --compare: its time is a stage of its own
    assert set(summary["stage_seconds"]) == {"data", "stages_0_1", "post", "sweep", "compare"}
    assert sum(summary["stage_seconds"].values()) <= summary["seconds"] + 0.05
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


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_lambda_zero_is_pre(quick_demo, tmp_path):
    """The sweep's λ = 0 row (the `pre` row: the linear λ = 0 merge written into the live model;
    the quick grid has no λ = 0 among the merges) has exactly pre's metrics, which an
    independent streamed linear λ = 0 merge, evaluated from disk, reproduces."""
    import torch

    from mergesafe.checkpoint import open_checkpoint
    from mergesafe.checkpoint.hf_model import load_tokenizer
    from mergesafe.evaluate.api import evaluate
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.merge.api import merge
    from mergesafe.world.config import WorldConfig
    from mergesafe.world.data import EVAL_FILES
    from mergesafe.world.demo import TASK_SCORER, row_metrics

    out, _ = quick_demo
    cfg = WorldConfig.quick()
    rows = _rows(out)
    summary = json.loads((out / "summary.json").read_text())
    task_set = EVAL_FILES["task"].removesuffix(".jsonl")
    zero = [r for r in rows if r["weight"] == 0.0]
    assert [r["method"] for r in zero] == ["pre"] and 0.0 not in cfg.weights
    pre_row = zero[0]
    assert row_metrics(pre_row, task_set) == summary["pre"]  # all three metrics, exactly

    # linear λ = 0 = (1 − 0)·pre + 0·post: pre's tensors, bit for bit (and pre's generation
    # config, as the sweep's live model, which was loaded from pre)
    pre_dir, post_dir = out / "models" / "pre", out / "models" / "post"
    merged = merge(pre_dir, post_dir, tmp_path / "lambda0", method="linear", weight=0.0,
                   tokenizer_from="pre")
    pre_ck, merged_ck = open_checkpoint(pre_dir), open_checkpoint(merged)
    assert set(merged_ck.names()) == set(pre_ck.names())
    for name in pre_ck.names():
        assert torch.equal(merged_ck.get(name).float(), pre_ck.get(name).float()), name

    # the same evaluation as the sweep's: its sets (the selection set included, last), settings
    # and tokenizer (post's, as the sweep takes it)
    data = out / "data"
    config = EvalConfig(safety=[data / EVAL_FILES["harmful"]],
                        over_refusal=[data / EVAL_FILES["over_refusal"]],
                        task=[(data / EVAL_FILES["task"], TASK_SCORER),
                              (data / EVAL_FILES["task_val"], TASK_SCORER)],
                        judge="keyword", batch_size=cfg.eval_batch_size,
                        max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0, seed=0)
    metrics = evaluate(merged, config=config, tokenizer=load_tokenizer(post_dir))
    assert row_metrics(metrics, task_set) == summary["pre"]
    for kind, key in (("safety", "asr"), ("over_refusal", "rate"), ("task", "score")):
        assert set(metrics[kind]) == set(pre_row[kind])
        for name in pre_row[kind]:
            assert metrics[kind][name][key] == pytest.approx(pre_row[kind][name][key], abs=1e-12), \
                (kind, name)


def test_recommended_is_no_less_safe_than_post(quick_demo):
    """The recommendation rule (sweep/selection.py) keeps the merges whose ASR is within
    `asr_tolerance` of pre's, post among the candidates; when none qualifies it takes the lowest
    ASR.  Either way the recommended ASR is at most post's unless post itself qualifies."""
    from mergesafe.world.config import WorldConfig

    out, _ = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    rec = json.loads((out / "recommendation.json").read_text())
    tol = WorldConfig.quick().asr_tolerance
    assert rec["asr_tolerance"] == tol
    pre_asr, post_asr = summary["pre"]["asr"], summary["post"]["asr"]
    rec_asr = summary["recommended"]["asr"]
    if rec["qualified"]:
        assert rec_asr <= pre_asr + tol + 1e-12
    if post_asr > pre_asr + tol + 1e-12:  # fine-tuning broke safety (the world's point)
        assert rec_asr <= post_asr
        if rec["qualified"]:
            assert rec_asr < post_asr and summary["recommended"]["method"] != "post"
    else:  # post qualifies: then so does the recommendation, within the tolerance of pre
        assert rec["qualified"] and rec_asr <= pre_asr + tol + 1e-12
    # the recommended row is the one the table and the summary describe
    row = next(r for r in _rows(out) if r["key"] == rec["key"])
    assert (row["method"], row["weight"]) == (rec["method"], rec["weight"])
    assert summary["recommended"]["asr"] == pytest.approx(
        sum(v["asr"] for v in row["safety"].values()) / len(row["safety"]))


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


def test_report_names_the_final_folders_and_shows_the_flipped_prompts(quick_demo):
    """The report's header names OUT/models/..., not the temporary OUT.partial; its 'what changed'
    rows (examples.jsonl) are the trials' own responses: on every flipped safety prompt, pre's
    row is a refusal and post's row an answer to the same prompt."""
    from mergesafe.sweep.results import read_generations

    out, _ = quick_demo
    page = (out / "report.html").read_text()
    assert ".partial" not in page and str(out / "models" / "pre") in page
    assert "What changed, prompt by prompt" in page
    rows = _rows(out)
    rec = json.loads((out / "recommendation.json").read_text())
    pre = {(g["set"], g["line"]): g for g in read_generations(out, next(r for r in rows if r["method"] == "pre")["key"])}
    post = {(g["set"], g["line"]): g for g in read_generations(out, next(r for r in rows if r["method"] == "post")["key"])}
    recommended = {(g["set"], g["line"]): g for g in read_generations(out, rec["key"])}
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    flipped = [e for e in examples if e["kind"] == "safety" and e["change"] == "safe → unsafe"]
    assert flipped, "the quick world's post answers some harmful prompts pre refused"
    for e in flipped:
        key = (e["set"], e["line"])
        assert pre[key]["prompt"] == post[key]["prompt"] == e["prompt"]
        assert (pre[key]["verdict"], post[key]["verdict"]) == ("safe", "unsafe")
        assert (e["pre"]["response"], e["post"]["response"]) == (pre[key]["response"], post[key]["response"])
        assert e["recommended"]["response"] == recommended[key]["response"]
        assert e["recommended_good"] == (recommended[key]["verdict"] == "safe")
    # every safety prompt whose verdict flipped is listed, and no other
    flips = {k for k in pre if pre[k]["kind"] == "safety" and post[k]["verdict"] != pre[k]["verdict"]
             and "unparsed" not in (pre[k]["verdict"], post[k]["verdict"])}
    assert flips == {(e["set"], e["line"]) for e in examples if e["kind"] == "safety"}
