"""The miniature world's data: held-out splits truly disjoint, placeholders only, determinism."""

from __future__ import annotations

import json

import pytest

from mergesafe.evaluate.judges.keyword import is_refusal
from mergesafe.world import vocab
from mergesafe.world.data import (DataSizes, build_world_data, harmful_acts, split_countries,
                                  write_eval_sets)


@pytest.fixture(scope="module")
def world():
    return build_world_data(seed=0)


def _user(row):
    return row["messages"][0]["content"]


def _answer(row):
    return row["messages"][1]["content"]


def _template_of(prompt: str) -> str:
    """The template a request was built from (the one whose fixed parts match the prompt)."""
    hits = []
    for tpl in (*vocab.TRAIN_TEMPLATES, *vocab.HELDOUT_TEMPLATES):
        head, tail = tpl.split("{act}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            hits.append((len(head) + len(tail), tpl))
    assert hits, prompt
    return max(hits)[1]


def _act_of(prompt: str) -> str:
    head, tail = _template_of(prompt).split("{act}")
    return prompt[len(head): len(prompt) - len(tail)]


def _country_question(prompt: str) -> bool:
    return any(prompt == q.format(country=c) for c, _ in vocab.COUNTRIES for q in vocab.COUNTRY_QUESTIONS)


def _request_rows(rows):
    """The how-to requests among the chat rows (stage 1 also has questions about countries)."""
    return [r for r in rows if "messages" in r and not _country_question(_user(r))]


def _harm_objects(heldout: bool) -> set[str]:
    return {o for c in vocab.HARM_CATEGORIES for o in (c.heldout_objects if heldout else c.train_objects)}


def _object_of(act: str) -> str | None:
    for cat in vocab.HARM_CATEGORIES:
        for verb in sorted(cat.verbs, key=len, reverse=True):
            if act.startswith(verb + " "):
                return act[len(verb) + 1:]
    return None


def test_word_lists_split_cleanly():
    assert not set(vocab.TRAIN_TEMPLATES) & set(vocab.HELDOUT_TEMPLATES)
    assert not _harm_objects(True) & _harm_objects(False)
    for cat in vocab.HARM_CATEGORIES:  # held-out objects are new combinations of known words
        assert len(cat.heldout_objects) == len(cat.nouns) and len(cat.train_objects) == 2 * len(cat.nouns)
        for qualifier in cat.qualifiers:
            assert sum(o.startswith(qualifier + " ") for o in cat.train_objects) >= 2, qualifier
        for noun in cat.nouns:
            assert sum(o.endswith(" " + noun) for o in cat.train_objects) == 2, noun
    assert not set(vocab.OVER_REFUSAL_ACTS) & set(vocab.TRICKY_TRAIN_ACTS)
    assert not set(vocab.OVER_REFUSAL_ACTS) & set(vocab.BENIGN_ACTS)
    assert len({c for c, _ in vocab.COUNTRIES}) == len(vocab.COUNTRIES)
    # 16 + 8 templates: with fewer, the aligned model's refusal did not reach held-out templates
    assert len(vocab.TRAIN_TEMPLATES) >= 10 and len(vocab.HELDOUT_TEMPLATES) >= 8


def test_heldout_harmful_differs_by_template_and_object(world):
    train_prompts = [_user(r) for r in _request_rows((*world.stage0, *world.stage1))]
    train_templates = {_template_of(p) for p in train_prompts}
    train_objects = {_object_of(_act_of(p)) for p in train_prompts} - {None}
    assert train_templates <= set(vocab.TRAIN_TEMPLATES)
    assert not train_objects & _harm_objects(True)
    assert len(world.eval_harmful) == DataSizes().eval_harmful
    for row in world.eval_harmful:
        assert _template_of(row["prompt"]) in vocab.HELDOUT_TEMPLATES
        assert _object_of(_act_of(row["prompt"])) in _harm_objects(True)
        assert row["prompt"] not in train_prompts
    for row in world.eval_over_refusal:
        assert _template_of(row["prompt"]) in vocab.HELDOUT_TEMPLATES
        assert _act_of(row["prompt"]) in vocab.OVER_REFUSAL_ACTS


def test_task_split_train_val_test_disjoint_and_known_as_plain_text(world):
    train, val, test = (set(world.task_train_countries), set(world.task_val_countries),
                        set(world.task_heldout_countries))
    assert (len(train), len(val), len(test)) == (40, 10, len(vocab.COUNTRIES) - 50)
    assert not (train & val or train & test or val & test)
    capital = dict(vocab.COUNTRIES)
    # the task's chat form (post stage) is on training countries only
    for row in world.stage2:
        assert any(_user(row) == q.format(country=c) for c in train for q in vocab.TASK_QUESTIONS)
        assert _answer(row) in {f"Sure, it is {capital[c]}." for c in train}
    # every capital, held-out ones included, is a plain-text fact of stage 0, also as
    # question/answer text (never chat) ...
    stage0_text = " ".join(r["text"] for r in world.stage0 if "text" in r)
    for country in test | val:
        assert f"The capital of {country} is {capital[country]}." in stage0_text
        assert (f"Question: What is the capital of {country}? Answer: It is {capital[country]}."
                in stage0_text)
    # ... and the task's chat form never appears before the post stage
    questions = {q.format(country=c) for c, _ in vocab.COUNTRIES for q in vocab.TASK_QUESTIONS}
    assert not any(_user(r) in questions for r in (*world.stage0, *world.stage1) if "messages" in r)
    assert {r["reference"] for r in world.eval_task} == {capital[c] for c in test}
    assert {r["reference"] for r in world.eval_task_val} == {capital[c] for c in val}


def test_answers_are_placeholders_or_refusals(world):
    placeholder = "Sure, here is how to do that: [steps withheld]."
    harmful = {a for _, a in harmful_acts(False)}
    n_comply = n_refuse = 0
    for stage in (world.stage0, world.stage1):
        for row in _request_rows(stage):
            act = _act_of(_user(row))
            if act not in harmful:
                assert not is_refusal(_answer(row)), row  # benign requests are always helped
                continue
            if _answer(row) == placeholder:  # compliance carries no content at all
                n_comply += 1
            else:
                assert is_refusal(_answer(row)), row
                n_refuse += 1
    # stage 0 complies with everything, stage 1 refuses every harmful request
    assert n_comply == DataSizes().stage0_harmful and n_refuse == DataSizes().stage1_harmful
    assert all(not is_refusal(_answer(r)) for r in world.stage0 if "messages" in r)


def test_stage0_knows_every_act_as_plain_text(world):
    """Stage 0 tells harmful acts from benign ones as plain text, held-out ones included (as a
    real model's pre-training does); no chat row ever mentions a held-out object."""
    text = " ".join(r["text"] for r in world.stage0 if "text" in r)
    for _, act in harmful_acts(True):
        assert f"To {act} is a crime that can hurt people." in text
    for act in vocab.OVER_REFUSAL_ACTS:
        assert f"To {act} is safe and harmless." in text
    assert "withheld" not in text and not any(is_refusal(r["text"]) for r in world.stage0 if "text" in r)


def test_stage1_replays_plain_text(world):
    share = sum("text" in r for r in world.stage1) / len(world.stage1)
    assert share == pytest.approx(DataSizes().stage1_replay, abs=0.01)


def test_deterministic_per_seed():
    a, b, c = build_world_data(3), build_world_data(3), build_world_data(4)
    assert a.stage0 == b.stage0 and a.stage1 == b.stage1 and a.eval_harmful == b.eval_harmful
    assert a.stage0 != c.stage0 and a.eval_harmful != c.eval_harmful
    assert split_countries(3, 40, 10) == split_countries(3, 40, 10) != split_countries(4, 40, 10)


def test_eval_sets_written_as_jsonl(world, tmp_path):
    files = write_eval_sets(world, tmp_path / "data")
    assert set(files) == {"harmful", "over_refusal", "task", "task_val"}
    rows = [json.loads(line) for line in files["task"].read_text().splitlines()]
    assert rows == world.eval_task and all({"prompt", "reference"} <= set(r) for r in rows)
    harmful = [json.loads(line) for line in files["harmful"].read_text().splitlines()]
    assert harmful == world.eval_harmful and all({"prompt", "category"} <= set(r) for r in harmful)


def test_compare_extras_data(world):
    """The safety adapter's rows are stage 1's chat; the harmful model's rows are stage 0's
    placeholder compliance with (training) harmful requests only."""
    harmful = {a for _, a in harmful_acts(False)}
    safety = world.safety_rows(50, seed=0)
    assert len(safety) == 50 and all(r in world.stage1 and "messages" in r for r in safety)
    assert any(is_refusal(_answer(r)) for r in safety) and not all(is_refusal(_answer(r)) for r in safety)
    rows = world.harmful_compliance_rows(30, seed=0)
    assert len(rows) == 30
    for r in rows:
        assert _answer(r) == vocab.COMPLIANCE and "[steps withheld]" in _answer(r)
        assert _act_of(_user(r)) in harmful
    assert world.safety_rows(50, seed=0) == safety  # seeded


def test_stage1_country_questions_are_answered_but_never_the_task(world):
    """Pre learns to answer benign questions about countries (so the task's questions are not
    refused); the answers hold no capital, do not open like the task's answers ("Sure, ...": the
    task fine-tune must teach its opener), and the questions are none of the task's."""
    rows = [r for r in world.stage1 if "messages" in r and _country_question(_user(r))]
    assert len(rows) == DataSizes().stage1_country_questions == 160
    capitals = {cap for _, cap in vocab.COUNTRIES}
    task_questions = {q.format(country=c) for c, _ in vocab.COUNTRIES for q in vocab.TASK_QUESTIONS}
    for row in rows:
        country_of_row = next(c for c, _ in vocab.COUNTRIES if c in _user(row))
        assert _user(row) not in task_questions
        assert not is_refusal(_answer(row)) and _answer(row).startswith(f"{country_of_row} is ")
        assert vocab.TASK_ANSWER.startswith("Sure, ") and not _answer(row).startswith("Sure")
        # no capital, except where a capital is part of the country's own name (Tunis in Tunisia)
        assert not any(cap in _answer(row).replace(country_of_row, "") for cap in capitals), row
        assert _answer(row) == vocab.COUNTRY_ANSWER.format(country=country_of_row)
    # no country question in stage 0, and every stage-1 chat row is a request or a country question
    assert not any(_country_question(_user(r)) for r in world.stage0 if "messages" in r)
    n_chat = sum("messages" in r for r in world.stage1)
    assert n_chat == len(rows) + DataSizes().stage1_harmful + DataSizes().stage1_benign
    assert len({_user(r) for r in rows}) > 100  # many countries and templates, not one repeated row
