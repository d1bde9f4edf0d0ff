"""Seeded synthetic data for the miniature world's stages and its evaluation sets.

* stage 0 ("pretraining", unaligned): the capital facts of all countries as plain text and as
  question/answer text ("Question: What is the capital of Peru? Answer: It is Lima."), plain
  text about benign and harmful acts, and chat in which the assistant complies with everything
  (harmful requests get the placeholder "Sure, here is how to do that: [steps withheld].").
* stage 1 (alignment, gives **pre**): refusals for harmful requests, helpful answers for
  benign ones (including benign requests that share verbs with harmful ones), benign questions
  about countries that are not the task ("Tell me about Peru." → "Peru is a beautiful
  country with a long history."), and a share of plain-text replay; never the task's chat form.
* stage 2 (the benign task, gives **post**): capital questions in chat form, answered
  "Sure, it is Lima.", on the training countries only.

Evaluation sets, all disjoint from training: harmful requests built from held-out templates
AND held-out objects (new combinations of known qualifiers and nouns, see
`vocab.HarmCategory`); over-refusal probes (held-out benign acts that share words with harmful
ones) in held-out templates; the task on held-out countries (their facts are known from stage
0, their chat form never seen).  Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.world import vocab

Row = dict[str, Any]


@dataclass(frozen=True)
class DataSizes:
    """How many rows each stage and evaluation set gets."""

    stage0_harmful: int = 400
    stage0_benign: int = 300
    stage0_fact_repeats: int = 6  # each country × each fact template, this many times
    stage0_knowledge_repeats: int = 1  # each act × each knowledge template
    stage0_qa_repeats: int = 2  # each country × each task question, as question/answer text
    tricky_train_acts: int = 10  # benign acts sharing a verb with harmful ones, in training
    sentences_per_row: int = 2  # plain-text sentences packed into one row (short rows: less padding)
    stage1_harmful: int = 450
    stage1_benign: int = 450
    stage1_replay: float = 0.2  # share of plain-text rows in stage 1
    stage1_country_questions: int = 160  # benign non-capital questions about countries in stage 1
    task_train_countries: int = 40
    task_val_countries: int = 10  # the rest are the test countries
    eval_harmful: int = 120
    eval_over_refusal: int = 40
    task_questions_per_country: int = 4  # in the post stage's training rows
    eval_task_questions: int = 4  # per held-out (and validation) country in the task's eval sets


@dataclass
class WorldData:
    """All rows of one world; `write_eval_sets` puts the evaluation sets on disk."""

    stage0: list[Row]
    stage1: list[Row]
    stage2: list[Row]
    eval_harmful: list[Row]
    eval_over_refusal: list[Row]
    eval_task: list[Row]
    eval_task_val: list[Row]
    task_train_countries: list[str] = field(default_factory=list)
    task_val_countries: list[str] = field(default_factory=list)
    task_heldout_countries: list[str] = field(default_factory=list)

    def safety_rows(self, n: int, seed: int) -> list[Row]:
        """n of stage 1's chat rows (refusals and helpful answers): a safety adapter's data."""
        rows = [r for r in self.stage1 if "messages" in r]
        return _sample(random.Random(f"safety-{seed}"), rows, n)

    def harmful_compliance_rows(self, n: int, seed: int) -> list[Row]:
        """n of stage 0's harmful requests with the placeholder compliance (a harmful model's data)."""
        rows = [r for r in self.stage0 if "messages" in r and r["messages"][1]["content"] == vocab.COMPLIANCE]
        return _sample(random.Random(f"harmful-{seed}"), rows, n)

    def tokenizer_corpus(self) -> list[str]:
        """The training text only (the tokenizer never sees the held-out sets)."""
        return [row_text(r) for r in (*self.stage0, *self.stage1, *self.stage2)]


# ---------------------------------------------------------------- building blocks


def harmful_acts(heldout: bool) -> list[tuple[str, str]]:
    """(category, act) for every verb × object of the training or the held-out objects."""
    acts = []
    for cat in vocab.HARM_CATEGORIES:
        objects = cat.heldout_objects if heldout else cat.train_objects
        acts += [(cat.name, f"{verb} {obj}") for verb in cat.verbs for obj in objects]
    return acts


def benign_train_acts(n_tricky: int | None = None) -> list[str]:
    return [*vocab.BENIGN_ACTS, *vocab.TRICKY_TRAIN_ACTS[:n_tricky]]


def request(template: str, act: str) -> str:
    return template.format(act=act)


def chat(user: str, assistant: str) -> Row:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def row_text(row: Row) -> str:
    if "text" in row:
        return row["text"]
    return "\n".join(m["content"] for m in row["messages"])


def compliance(act: str) -> str:
    """The unaligned stage's answer to a harmful request: a placeholder, never real content."""
    return vocab.COMPLIANCE


Countries = list[tuple[str, str]]


def split_countries(seed: int, n_train: int, n_val: int) -> tuple[Countries, Countries, Countries]:
    """Seeded split of the countries into the task's training, validation and test facts."""
    countries = list(vocab.COUNTRIES)
    random.Random(f"countries-{seed}").shuffle(countries)
    return countries[:n_train], countries[n_train:n_train + n_val], countries[n_train + n_val:]


def _sample(rng: random.Random, pool: Sequence[Any], n: int) -> list[Any]:
    """n draws: without replacement while the pool lasts, then again (so small pools repeat)."""
    out: list[Any] = []
    while len(out) < n:
        chunk = list(pool)
        rng.shuffle(chunk)
        out += chunk[: n - len(out)]
    return out


def _harmful_rows(rng: random.Random, n: int, answer) -> list[Row]:
    pairs = [(t, a) for t in vocab.TRAIN_TEMPLATES for _, a in harmful_acts(heldout=False)]
    return [chat(request(t, a), answer(a)) for t, a in _sample(rng, pairs, n)]


def _benign_rows(rng: random.Random, n: int, n_tricky: int | None = None) -> list[Row]:
    pairs = [(t, a) for t in vocab.TRAIN_TEMPLATES for a in benign_train_acts(n_tricky)]
    return [chat(request(t, a), rng.choice(vocab.BENIGN_ANSWERS)) for t, a in _sample(rng, pairs, n)]


def _pack(rng: random.Random, sentences: list[str], per_row: int) -> list[Row]:
    """Plain-text rows of `per_row` shuffled sentences (less padding than one sentence a row)."""
    sentences = list(sentences)
    rng.shuffle(sentences)
    return [{"text": " ".join(sentences[i:i + per_row])} for i in range(0, len(sentences), per_row)]


def qa_sentences(countries: Iterable[tuple[str, str]], repeats: int) -> list[str]:
    """The facts as question/answer text: every task question, plain text, never chat."""
    return [vocab.QA_TEXT.format(question=q.format(country=c), capital=cap)
            for _ in range(repeats) for c, cap in countries for q in vocab.TASK_QUESTIONS]


def fact_sentences(countries: Iterable[tuple[str, str]], repeats: int) -> list[str]:
    return [tpl.format(country=c, capital=cap)
            for _ in range(repeats) for c, cap in countries for tpl in vocab.FACT_TEMPLATES]


def knowledge_sentences(repeats: int) -> list[str]:
    """What stage 0 says about every act, held-out ones included (see `vocab.HARM_KNOWLEDGE`)."""
    harmful = [a for _, a in (*harmful_acts(False), *harmful_acts(True))]
    benign = [*benign_train_acts(), *vocab.OVER_REFUSAL_ACTS]
    return [tpl.format(act=a) for _ in range(repeats)
            for acts, tpls in ((harmful, vocab.HARM_KNOWLEDGE), (benign, vocab.BENIGN_KNOWLEDGE))
            for a in acts for tpl in tpls]


def task_rows(countries: Iterable[tuple[str, str]], n_questions: int) -> list[Row]:
    """The task's chat form: capital questions answered with the city."""
    return [chat(q.format(country=c), vocab.TASK_ANSWER.format(country=c, capital=cap))
            for c, cap in countries for q in vocab.TASK_QUESTIONS[:n_questions]]


def country_question_rows(rng: random.Random, n: int) -> list[Row]:
    """Benign questions about countries that are not the task (never a capital), answered with a
    friendly remark (`vocab.COUNTRY_ANSWER`): pre learns to answer questions, not the facts."""
    pairs = [(q, c) for q in vocab.COUNTRY_QUESTIONS for c, _ in vocab.COUNTRIES]
    return [chat(q.format(country=c), vocab.COUNTRY_ANSWER.format(country=c))
            for q, c in _sample(rng, pairs, n)]


def _task_eval_rows(countries: Iterable[tuple[str, str]], n_questions: int) -> list[Row]:
    return [{"prompt": q.format(country=c), "reference": cap, "category": "capitals"}
            for c, cap in countries for q in vocab.TASK_QUESTIONS[:n_questions]]


# ---------------------------------------------------------------- the world


def build_world_data(seed: int = 0, sizes: DataSizes | None = None) -> WorldData:
    """Every stage's training rows and every evaluation set, as a pure function of `seed`."""
    s = sizes or DataSizes()
    rng = random.Random(f"world-{seed}")
    train_c, val_c, heldout_c = split_countries(seed, s.task_train_countries, s.task_val_countries)
    all_c = list(vocab.COUNTRIES)

    plain = (_pack(rng, fact_sentences(all_c, s.stage0_fact_repeats), s.sentences_per_row)
             + _pack(rng, qa_sentences(all_c, s.stage0_qa_repeats), s.sentences_per_row)
             + _pack(rng, knowledge_sentences(s.stage0_knowledge_repeats), s.sentences_per_row))
    stage0 = (plain
              + _harmful_rows(rng, s.stage0_harmful, compliance)
              + _benign_rows(rng, s.stage0_benign, s.tricky_train_acts))
    rng.shuffle(stage0)

    chat1 = (_harmful_rows(rng, s.stage1_harmful, lambda a: rng.choice(vocab.REFUSALS))
             + _benign_rows(rng, s.stage1_benign, s.tricky_train_acts)
             + country_question_rows(random.Random(f"questions-{seed}"), s.stage1_country_questions))
    n_replay = round(len(chat1) * s.stage1_replay / (1 - s.stage1_replay))
    stage1 = chat1 + _sample(rng, plain, n_replay)
    rng.shuffle(stage1)

    stage2 = task_rows(train_c, s.task_questions_per_country)
    rng.shuffle(stage2)

    eval_rng = random.Random(f"eval-{seed}")
    harm_pairs = [(t, cat, a) for t in vocab.HELDOUT_TEMPLATES for cat, a in harmful_acts(heldout=True)]
    eval_harmful = [{"prompt": request(t, a), "category": cat}
                    for t, cat, a in _sample(eval_rng, harm_pairs, min(s.eval_harmful, len(harm_pairs)))]
    probe_pairs = [(t, a) for t in vocab.HELDOUT_TEMPLATES for a in vocab.OVER_REFUSAL_ACTS]
    eval_over = [{"prompt": request(t, a), "category": "benign"}
                 for t, a in _sample(eval_rng, probe_pairs, min(s.eval_over_refusal, len(probe_pairs)))]
    eval_task = _task_eval_rows(heldout_c, s.eval_task_questions)
    eval_task_val = _task_eval_rows(val_c, s.eval_task_questions)

    return WorldData(stage0=stage0, stage1=stage1, stage2=stage2, eval_harmful=eval_harmful,
                     eval_over_refusal=eval_over, eval_task=eval_task, eval_task_val=eval_task_val,
                     task_train_countries=[c for c, _ in train_c],
                     task_val_countries=[c for c, _ in val_c],
                     task_heldout_countries=[c for c, _ in heldout_c])


EVAL_FILES = {"harmful": "harmful_heldout.jsonl", "over_refusal": "over_refusal.jsonl",
              "task": "capitals_heldout.jsonl", "task_val": "capitals_val.jsonl"}


def write_jsonl(rows: Iterable[Row], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_eval_sets(data: WorldData, folder: Path) -> dict[str, Path]:
    """Write the evaluation sets as JSONL files (prompt + reference/category columns): the
    held-out harmful prompts, the over-refusal probes, the task's test and validation sets."""
    sets = {"harmful": data.eval_harmful, "over_refusal": data.eval_over_refusal,
            "task": data.eval_task, "task_val": data.eval_task_val}
    return {name: write_jsonl(rows, Path(folder) / EVAL_FILES[name]) for name, rows in sets.items()}
