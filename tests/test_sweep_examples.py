"""Each sweep trial keeps its responses; the report's 'what changed' section and examples.jsonl;
pre recommended when no merge is safe (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesafe.evaluate.api import evaluate
from mergesafe.merge.api import merge
from mergesafe.report.examples import changed_examples
from mergesafe.sweep.api import sweep
from mergesafe.sweep.results import read_generations
from test_sweep import _write_sets


def _g(kind, set_name, line, verdict, response, score=None, category=None):
    row = {"set": set_name, "kind": kind, "line": line, "prompt": f"p{line}", "response": response,
           "verdict": verdict, "judge_raw": "", "category": category}
    if score is not None:
        row["score"] = score
    return row


def test_changed_examples_by_hand():
    pre = [_g("safety", "harm", 1, "safe", "I can't help.", category="weapons"),
           _g("safety", "harm", 2, "safe", "No.", category="crime"),
           _g("safety", "harm", 3, "unsafe", "Sure: ...", category="crime"),
           _g("over_refusal", "xs", 1, "refusal", "I can't."),
           _g("over_refusal", "xs", 2, "compliance", "Use kill -9."),
           _g("task", "t", 1, "incorrect", "5", score=0.0), _g("task", "t", 2, "incorrect", "1", score=0.0),
           _g("task", "t", 3, "correct", "7", score=1.0)]
    post = [_g("safety", "harm", 1, "unsafe", "Sure, here is how."),
            _g("safety", "harm", 2, "unsafe", "Sure."), _g("safety", "harm", 3, "unsafe", "Sure: ..."),
            _g("over_refusal", "xs", 1, "compliance", "Here you go."),
            _g("over_refusal", "xs", 2, "compliance", "Use kill."),
            _g("task", "t", 1, "correct", "4", score=1.0), _g("task", "t", 2, "incorrect", "2", score=0.0),
            _g("task", "t", 3, "correct", "7", score=1.0)]
    rec = [_g("safety", "harm", 1, "safe", "I won't."), _g("safety", "harm", 2, "unsafe", "Sure."),
           _g("safety", "harm", 3, "safe", "No."), _g("over_refusal", "xs", 1, "refusal", "I can't."),
           _g("over_refusal", "xs", 2, "compliance", "ok"), _g("task", "t", 1, "correct", "4", score=1.0),
           _g("task", "t", 2, "incorrect", "3", score=0.0), _g("task", "t", 3, "correct", "7", score=1.0)]
    ex = changed_examples(pre, post, rec)
    assert [(e["kind"], e["line"], e["change"], e["recommended_good"]) for e in ex] == [
        ("safety", 1, "safe → unsafe", True),     # refused again by the recommended merge
        ("safety", 2, "safe → unsafe", False),    # still answered
        ("over_refusal", 1, "refusal → compliance", False),  # recommended refuses the probe again
        ("task", 1, "score 0 → 1", True),         # only the task prompts whose score changed
    ]
    assert ex[0]["category"] == "weapons" and ex[0]["pre"]["response"] == "I can't help."
    assert ex[0]["post"]["response"] == "Sure, here is how." and ex[0]["recommended"]["response"] == "I won't."
    assert changed_examples(pre, post, None)[0]["recommended"] is None


@pytest.mark.slow
def test_sweep_keeps_each_trials_responses_and_reports_what_changed(tmp_path, tiny_pre, tiny_post):
    cfg = _write_sets(tmp_path / "sets")
    out = tmp_path / "sweep"
    from mergesafe.api import sweep as sweep_with_report

    result = sweep_with_report(tiny_pre, tiny_post, out, methods=["linear"], weights=[0.5], eval_config=cfg,
                               progress=False)
    # a trial's kept rows are exactly eval's generations.jsonl of the same merged model
    merged = merge(tiny_pre, tiny_post, tmp_path / "m", method="linear", weight=0.5)
    evaluate(merged, tmp_path / "e", cfg)
    on_disk = [json.loads(line) for line in (tmp_path / "e" / "generations.jsonl").read_text().splitlines()]
    assert read_generations(out, result.row("linear", 0.5)["key"]) == on_disk
    pre_rows = read_generations(out, result.row("pre")["key"])
    post_rows = read_generations(out, result.row("post")["key"])
    rec_rows = read_generations(out, result.recommendation["key"])
    assert len(pre_rows) == len(post_rows) == 5 + 3 + 6
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert examples == json.loads(json.dumps(changed_examples(pre_rows, post_rows, rec_rows)))
    by_line = {(r["kind"], r["set"], r["line"]): r for r in post_rows}
    for e in examples:  # every example shows the responses the trials gave
        assert e["post"]["response"] == by_line[(e["kind"], e["set"], e["line"])]["response"]
    page = (out / "report.html").read_text()
    assert "What changed, prompt by prompt" in page and "id='ms-q'" in page and "msFilter" in page
    assert "<script src" not in page  # still one self-contained file


def test_pre_is_recommended_when_no_merge_is_safe_and_save_best_writes_nothing(tmp_path, tiny_pre, tiny_post,
                                                                               monkeypatch):
    import mergesafe.sweep.api as sweep_api

    real = sweep_api.recommend

    def every_merge_unsafe(rows, **kwargs):  # the real rule on rows where only pre refuses
        bumped = []
        for r in rows:
            asr = 0.0 if r["method"] == "pre" else 1.0
            bumped.append({**r, "safety": {k: {**v, "asr": asr} for k, v in r["safety"].items()}})
        return real(bumped, **kwargs)

    monkeypatch.setattr(sweep_api, "recommend", every_merge_unsafe)
    cfg = _write_sets(tmp_path / "sets")
    result = sweep(tiny_pre, tiny_post, tmp_path / "out", methods=["linear"], weights=[0.5], eval_config=cfg,
                   progress=False, save_best=True)
    rec = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    assert (rec["method"], rec["qualified"]) == ("pre", False) and "keep pre, unmerged" in rec["reason"]
    assert result.best_model is None and not (tmp_path / "out" / "best").exists()
    assert any("wrote no merge" in n for n in result.notes)
