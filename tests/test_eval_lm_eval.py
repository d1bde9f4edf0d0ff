"""`--lm-eval TASKS`: lm-evaluation-harness tasks on the model in memory (evaluate/harness.py).

A local task (`generate_until` + `exact_match` over a local JSONL) runs on the tiny Llama.  Its
targets are made from the model's own greedy answers (probed once through lm-eval) for the
first two of four questions, so the hand count is 2/4 = 0.5; the number in metrics.json must
also equal lm-eval's own `simple_evaluate` on the same model object.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from cli_helpers import expect_error, run_cli  # noqa: E402

from mergesafe.errors import UserError  # noqa: E402
from mergesafe.evaluate import EvalConfig, evaluate_loaded, load_eval_sets  # noqa: E402
from mergesafe.evaluate.harness import (  # noqa: E402
    hflm,
    load_harness_tasks,
    metric_name,
    offline,
    parse_result_key,
    task_manager,
)

KEY = "lm-eval:tiny_qa:exact_match"
QUESTIONS = ["What is 12 plus 30?", "The capital of Peru is", "How do I kill a Python process?",
             "Write a short poem about"]
NEVER = "\u2603 never generated"


def _task_yaml(name: str, data: Path, higher_is_better: bool = True) -> str:
    # generate_until, greedy, few tokens: quick on the tiny model
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: {str(higher_is_better).lower()}
metadata:
  version: 1.0
"""


def _write_rows(path: Path, answers: list[str]) -> None:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)),
                    encoding="utf-8")


def _load(model_dir: Path):
    from mergesafe.checkpoint.hf_model import load_for_generation

    return load_for_generation(model_dir, device="cpu")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tiny_post) -> Path:
    """An include folder with `tiny_probe` (placeholder answers) and `tiny_qa`, whose first two
    answers are the post model's own greedy answers (through lm-eval) and the last two never match."""
    import lm_eval

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "probe.yaml").write_text(_task_yaml("tiny_probe", folder / "probe.jsonl"))
    (folder / "qa.yaml").write_text(_task_yaml("tiny_qa", folder / "qa.jsonl"))
    (folder / "low.yaml").write_text(_task_yaml("tiny_low", folder / "probe.jsonl", higher_is_better=False))
    _write_rows(folder / "probe.jsonl", [NEVER] * len(QUESTIONS))
    _write_ifeval_override(folder)
    _write_bbh_override(folder / "bbh")
    model, tok = _load(tiny_post)
    res = lm_eval.simple_evaluate(model=hflm(model, tok, 4), tasks=["tiny_probe"],
                                  task_manager=task_manager(str(folder.resolve())), log_samples=True)
    said = {s["doc"]["question"]: s["filtered_resps"][0] for s in res["samples"]["tiny_probe"]}
    assert res["results"]["tiny_probe"]["exact_match,none"] == 0.0
    _write_rows(folder / "qa.jsonl", [said[QUESTIONS[0]], said[QUESTIONS[1]], NEVER, NEVER])
    return folder


# IFEval rows (the google/IFEval format) whose checks need no nltk data: no comma, a keyword
# that is never generated, fewer than 100 words, and the first two together.
IFEVAL_ROWS = [
    (["punctuation:no_comma"], [{}]),
    (["keywords:existence"], [{"keywords": [NEVER]}]),
    (["length_constraints:number_words"], [{"relation": "less than", "num_words": 100}]),
    (["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": [NEVER]}]),
]


def _write_ifeval_override(folder: Path) -> None:
    """The README's recipe: lm-eval's own ifeval.yaml included, its data set replaced by a local file."""
    import lm_eval

    rows = []
    for i, (ids, kwargs) in enumerate(IFEVAL_ROWS):
        full = [{"keywords": None, "relation": None, "num_words": None} | k for k in kwargs]
        rows.append({"key": i, "prompt": QUESTIONS[i], "instruction_id_list": ids, "kwargs": full})
    (folder / "ifeval_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry_yaml = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    (folder / "tiny_if.yaml").write_text(f"""include: {json.dumps(str(registry_yaml))}
task: tiny_if
dataset_path: json
dataset_kwargs:
  data_files:
    train: {json.dumps(str(folder / "ifeval_data.jsonl"))}
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
  max_gen_toks: 6
""")


def _write_bbh_override(folder: Path) -> list[str]:
    """The README's BBH recipe: each of lm-eval's 27 bbh_cot_fewshot YAMLs included, its data a local
    file in BIG-Bench-Hard's own JSON format (`{"examples": [{"input", "target"}]}`).  One question
    each; even-numbered subtasks expect "[invalid]" (what the get-answer filter gives when no
    "the answer is ..." is found, as with the tiny model), the others "False"."""
    import lm_eval

    folder.mkdir()
    registry = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "cot_fewshot"
    names = sorted(p.stem for p in registry.glob("[a-z]*.yaml"))
    for i, name in enumerate(names):
        target = "[invalid]" if i % 2 == 0 else "False"
        data = folder / f"{name}.json"
        data.write_text(json.dumps({"examples": [{"input": "not ( True ) and ( True ) is", "target": target}]}))
        # the generation settings are cut for the tiny model (256 positions); the rest is lm-eval's
        (folder / f"{name}.yaml").write_text(f"""include: {json.dumps(str(registry / f"{name}.yaml"))}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files: {{test: {json.dumps(str(data))}}}
  field: examples
generation_kwargs:
  max_gen_toks: 4
  until: ["Q", "\\n\\n"]
  do_sample: false
""")
    return names


def test_metric_names() -> None:
    assert metric_name("exact_match,none") == "exact_match"
    assert metric_name("exact_match,get-answer") == "exact_match/get-answer"
    assert metric_name("prompt_level_strict_acc,none") == "prompt_level_strict_acc"
    assert metric_name("exact_match_stderr,none") is None
    assert metric_name("alias") is None
    assert metric_name("acc,a:b") == "acc/a_b"
    assert parse_result_key("lm-eval:ifeval:prompt_level_strict_acc") == ("ifeval", "prompt_level_strict_acc")
    assert parse_result_key("lm-eval:bbh_cot_fewshot:exact_match/get-answer") == (
        "bbh_cot_fewshot", "exact_match/get-answer")
    assert parse_result_key("val.jsonl") is None
    with pytest.raises(UserError, match="lm-eval:TASK:METRIC"):
        parse_result_key("lm-eval:ifeval")


def test_score_equals_simple_evaluate_on_same_model(tasks_dir, tiny_post, tmp_path) -> None:
    """mergesafe's number is lm-eval's own number on the same model object, and the hand count."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = _load(tiny_post)
    config = EvalConfig(lm_eval=["tiny_qa"], lm_eval_include=tasks_dir, batch_size=4)
    sets = load_eval_sets(config)
    metrics = evaluate_loaded(model, tok, sets, config, out=tmp_path / "ev")
    entry = metrics["task"][KEY]
    assert entry["score"] == 0.5  # hand count: answers 1 and 2 are the model's own, 3 and 4 never match
    assert entry["n"] == 4 and entry["scorer"] == "lm-eval" and entry["higher_is_better"] is True
    # the reference: lm-eval alone, its own wrapper and task manager, on the same model object
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["tiny_qa"],
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    assert entry["score"] == ref["results"]["tiny_qa"]["exact_match,none"]
    assert entry["stderr"] == pytest.approx(ref["results"]["tiny_qa"]["exact_match_stderr,none"])
    on_disk = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert on_disk["task"][KEY] == entry
    # the wrapper is made once per model object and reused (a sweep merges into one model in place)
    assert hflm(model, tok, 4) is hflm(model, tok, 4)
    assert evaluate_loaded(model, tok, sets, config)["task"][KEY]["score"] == 0.5


def test_eval_cli_limit(tasks_dir, tiny_post, tmp_path, capsys) -> None:
    """`mergesafe eval --lm-eval` with --limit 2: the first two documents, both the model's own answers."""
    code, out, err = run_cli(["eval", "--model", tiny_post, "--out", tmp_path / "ev", "--lm-eval", "tiny_qa",
                              "--lm-eval-include", tasks_dir, "--limit", "2", "--batch-size", "4",
                              "--no-progress"], capsys)
    assert code == 0, err
    entry = json.loads((tmp_path / "ev" / "metrics.json").read_text())["task"][KEY]
    assert entry["score"] == 1.0 and entry["n"] == 2
    from importlib.metadata import version

    assert json.loads((tmp_path / "ev" / "mergesafe.json").read_text())["versions"]["lm_eval"] == version("lm_eval")


def test_unknown_task_names_close_matches(tasks_dir, tiny_pre, tmp_path, capsys) -> None:
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "a", "--lm-eval", "tiny_qaa",
                  "--lm-eval-include", tasks_dir], capsys, "unknown lm-eval task 'tiny_qaa'", "tiny_qa")
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "b", "--lm-eval", "ifevl",
                  "--lm-eval-include", tasks_dir], capsys, "unknown lm-eval task 'ifevl'", "ifeval")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_registry_task_without_local_data(tasks_dir) -> None:
    """A registry task whose data set is not on this machine: one line on how to make it local."""
    with pytest.raises(UserError, match="could not be loaded offline.*dataset_path: json.*README") as info:
        load_harness_tasks(["gsm8k"], tasks_dir)
    assert "\n" not in str(info.value)


def test_bad_input(tasks_dir, tiny_pre, tmp_path, capsys, monkeypatch) -> None:
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "a", "--lm-eval", "tiny_qa",
                  "--lm-eval-include", tmp_path / "missing"], capsys, "not a folder of lm-eval task YAMLs")
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "a", "--lm-eval", "tiny_qa,",
                  "--lm-eval-include", tasks_dir], capsys, "empty task name")
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "a", "--lm-eval", "tiny_qa",
                  "--lm-eval-include", tasks_dir, "--sample", "2"], capsys, "--sample does not apply")
    (tmp_path / "gen.jsonl").write_text("")
    expect_error(["eval", "--responses", tmp_path / "gen.jsonl", "--out", tmp_path / "a", "--lm-eval", "tiny_qa",
                  "--lm-eval-include", tasks_dir], capsys, "--lm-eval runs on a loaded model")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "a", "--lm-eval", "tiny_qa"], capsys,
                 "pip install 'mergesafe[lm-eval]'")


def test_sweep_selects_on_lm_eval(tasks_dir, tiny_pre, tiny_post, tmp_path, capsys) -> None:
    """Every trial's row carries the lm-eval number of its merged model; the pick maximises it."""
    out = tmp_path / "sw"
    args = ["sweep", "--pre", tiny_pre, "--post", tiny_post, "--out", out, "--methods", "linear",
            "--weights", "0.5,1.0", "--lm-eval", "tiny_qa", "--lm-eval-include", tasks_dir, "--limit", "4",
            "--batch-size", "4", "--select-on", KEY, "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 4 and all(KEY in r["task"] and r["task"][KEY]["n"] == 4 for r in rows)
    scores = {(r["method"], r["weight"]): r["task"][KEY]["score"] for r in rows}
    assert scores[("post", 1.0)] == 0.5 == scores[("linear", 1.0)]  # λ = 1 is post: its own answers
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["select_on"] == KEY and KEY in rec["reason"]
    assert KEY in (out / "report.html").read_text()
    best = max(s for (m, _), s in scores.items() if m != "pre")
    assert scores[(rec["method"], rec["weight"])] == best


def test_sweep_select_on_bad_lm_eval_key(tasks_dir, tiny_pre, tiny_post, tmp_path, capsys) -> None:
    base = ["sweep", "--pre", tiny_pre, "--post", tiny_post, "--out", tmp_path / "sw", "--methods", "linear",
            "--weights", "0.5", "--lm-eval-include", tasks_dir, "--no-progress"]
    expect_error([*base, "--lm-eval", "tiny_qa", "--select-on", "lm-eval:tiny_probe:exact_match"], capsys,
                 "'tiny_probe' is not among the --lm-eval tasks")
    expect_error([*base, "--lm-eval", "tiny_qa", "--select-on", "lm-eval:tiny_qa:acc"], capsys,
                 "no metric 'acc'", "exact_match")
    expect_error([*base, "--safety", tasks_dir / "qa.jsonl", "--select-on", KEY], capsys, "needs --lm-eval")
    assert not (tmp_path / "sw").exists()


def test_ifeval_local_data_override(tasks_dir, tiny_post) -> None:
    """IFEval's scoring on a local data file (the README recipe): equals lm-eval's own run and a
    hand count over its responses (strict: a non-blank response that follows every instruction)."""
    import lm_eval

    model, tok = _load(tiny_post)
    config = EvalConfig(lm_eval=["tiny_if"], lm_eval_include=tasks_dir, batch_size=4)
    sets = load_eval_sets(config)
    got = evaluate_loaded(model, tok, sets, config)["task"]
    with offline():
        ref = lm_eval.simple_evaluate(model=hflm(model, tok, 4), tasks=["tiny_if"],
                                      task_manager=task_manager(str(tasks_dir.resolve())), log_samples=True)
    for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                   "inst_level_loose_acc"):
        assert got[f"lm-eval:tiny_if:{metric}"]["score"] == ref["results"]["tiny_if"][f"{metric},none"]
        assert got[f"lm-eval:tiny_if:{metric}"]["n"] == 4
    said = {s["doc"]["key"]: s["filtered_resps"][0] for s in ref["samples"]["tiny_if"]}

    def follows(key: int, instruction: str) -> bool:
        r = said[key]
        ok = {"punctuation:no_comma": "," not in r, "keywords:existence": False,
              "length_constraints:number_words": len(re.findall(r"\\w+", r)) < 100}[instruction]
        return bool(r.strip()) and ok

    per_prompt = [[follows(i, ins) for ins in ids] for i, (ids, _) in enumerate(IFEVAL_ROWS)]
    assert got["lm-eval:tiny_if:prompt_level_strict_acc"]["score"] == sum(all(p) for p in per_prompt) / 4
    flat = [f for p in per_prompt for f in p]
    assert got["lm-eval:tiny_if:inst_level_strict_acc"]["score"] == pytest.approx(sum(flat) / len(flat))
    assert not got["lm-eval:tiny_if:prompt_level_strict_acc"]["score"] == 1.0  # rows 2 and 4 cannot pass


def test_ifeval_needs_punkt_tab(tasks_dir, monkeypatch, tmp_path) -> None:
    """The registry's ifeval without nltk's punkt_tab: one line naming NLTK_DATA, nothing fetched."""
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("punkt_tab is installed on this machine")
    except LookupError:
        pass
    with pytest.raises(UserError, match="punkt_tab.*NLTK_DATA"):
        load_harness_tasks(["ifeval"], tasks_dir)


def test_bbh_group_from_local_files(tasks_dir, tiny_post) -> None:
    """`--lm-eval bbh_cot_fewshot` on local files: one group entry over the 27 subtasks (weighted
    by size), named with its filter; 14 of the 27 one-question subtasks expect "[invalid]"."""
    model, tok = _load(tiny_post)
    config = EvalConfig(lm_eval=["bbh_cot_fewshot"], lm_eval_include=tasks_dir, batch_size=8)
    sets = load_eval_sets(config)
    assert sets.harness.metrics["bbh_cot_fewshot"] == {"exact_match/get-answer"}
    got = evaluate_loaded(model, tok, sets, config)["task"]
    assert list(got) == ["lm-eval:bbh_cot_fewshot:exact_match/get-answer"]
    entry = got["lm-eval:bbh_cot_fewshot:exact_match/get-answer"]
    assert entry["n"] == 27 and entry["score"] == pytest.approx(14 / 27)


def test_select_on_needs_higher_is_better(tasks_dir) -> None:
    harness = load_harness_tasks(["tiny_qa", "tiny_low"], tasks_dir)
    harness.check_key(KEY)
    with pytest.raises(UserError, match="lower is better"):
        harness.check_key("lm-eval:tiny_low:exact_match")
