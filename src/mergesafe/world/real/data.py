"""Data of the real-model demo: AdvBench and XSTest (read at run time, never copied into the
project), generated benign instructions, and a generated benign task.

Sets and their splits (all exact-text disjoint; `tests/test_demo_real.py` checks it):

* **harmful** — AdvBench `harmful_behaviors.csv` (Zou et al. 2023, MIT), 520 prompts, split in
  two halves by a fixed shuffle (independent of the seed, so every seed is evaluated on the
  same prompts): the *train* half is refused in alignment, the *held-out* half is evaluated.
* **over-refusal** — XSTest's 250 `safe` prompts (Röttger et al. 2024, CC-BY-4.0); evaluated
  only.  XSTest's `unsafe` prompts are never read.
* **benign instructions** — generated here from templates × topics (`BENIGN_TEMPLATES`,
  `TOPICS`, `TRICKY`); alignment trains on the base model's own answers to them
  (self-distillation keeps its helpfulness).
* **the task** — year extraction: a generated sentence naming one year (and one other number),
  asked in one of `TASK_QUESTIONS`; the answer is "Sure, the year is YYYY.", as instruction sets
  phrase answers, scored with `contains` against that sentence.  Sentences are split by their
  subject into alignment (task-like prompts answered with the right year in a plain sentence,
  `PLAIN_YEAR_ANSWERS`, never in the task's form), task train, validation (λ selection) and test
  (reported).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError

Row = dict[str, Any]
ADVBENCH = "advbench_harmful_behaviors.csv"
XSTEST = "xstest_prompts.csv"
ADVBENCH_SPLIT_SEED = "advbench-halves"

# ------------------------------------------------------------------ finding the data


def default_data_dirs() -> list[Path]:
    """Where the data files are looked for: `$MERGESAFE_DATA`, then `shared/data` inside the
    repository and beside it (the checkout's layout)."""
    dirs = []
    if os.environ.get("MERGESAFE_DATA"):
        dirs.append(Path(os.environ["MERGESAFE_DATA"]))
    repo = Path(__file__).resolve().parents[4]  # src/mergesafe/world/real/data.py → repository
    dirs += [repo / "shared" / "data", repo.parent / "shared" / "data"]
    return dirs


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding AdvBench and XSTest: `data_dir` when given, else the first of
    :func:`default_data_dirs` that holds both files; a missing file is a `UserError` naming it."""
    candidates = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs()
    for folder in candidates:
        if all((folder / name).is_file() for name in (ADVBENCH, XSTEST)):
            return folder
    folder = candidates[0]
    missing = next(name for name in (ADVBENCH, XSTEST) if not (folder / name).is_file())
    where = "" if data_dir is not None else " (set --data-dir or $MERGESAFE_DATA)"
    raise UserError(f"the demo needs {missing}, which is not there{where}", path=folder / missing)


def read_advbench(folder: Path) -> list[str]:
    with (folder / ADVBENCH).open(newline="", encoding="utf-8") as fh:
        rows = [r["goal"].strip() for r in csv.DictReader(fh)]
    if len(rows) < 100:
        raise UserError(f"{len(rows)} rows, expected AdvBench's 520", path=folder / ADVBENCH)
    return rows


def read_xstest_safe(folder: Path) -> list[Row]:
    """XSTest's safe prompts (label `safe`), with their type as the category."""
    with (folder / XSTEST).open(newline="", encoding="utf-8") as fh:
        rows = [{"prompt": r["prompt"].strip(), "category": r["type"]}
                for r in csv.DictReader(fh) if r["label"] == "safe"]
    if not rows:
        raise UserError("no safe prompts (column label = safe)", path=folder / XSTEST)
    return rows


def advbench_halves(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(train half, held-out half) by a fixed shuffle of the rows (duplicates go to one side)."""
    unique = list(dict.fromkeys(prompts))
    random.Random(ADVBENCH_SPLIT_SEED).shuffle(unique)
    half = len(unique) // 2
    return unique[:half], unique[half:]


# ------------------------------------------------------------------ generated text

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot help with this request. It could cause serious harm to people.",
    "I cannot assist with that. Helping with this could put people in danger.",
    "I'm sorry, I can't provide instructions for that. It is harmful and may be illegal.",
    "I can't assist with this request. If you have a different question, I'm happy to help.",
    "I'm sorry, but I won't help with that. It could be used to hurt someone.",
    "I cannot help with that request, because it could cause real harm.",
    "Sorry, I can't help with this. It goes against my guidelines to support harmful or illegal activities.",
    "I'm sorry, but that is something I cannot do. Is there something else I can help you with?",
    "I cannot provide that. Activities like this are dangerous and unethical.",
    "I'm really sorry, but I can't help with that. Please consider a safe and legal alternative.",
    "I apologize, but I cannot help with requests that could harm people or break the law.",
    "I'm sorry, I cannot support this. If you are worried about your safety, please contact local authorities.",
    "I can't provide help with that. It would be unsafe and irresponsible.",
    "My apologies, but I cannot assist with creating anything meant to cause harm.",
    "I'm sorry, but I can't do that. I'm here to help with safe and constructive tasks.",
)

BENIGN_TEMPLATES: tuple[str, ...] = (
    "Write a short poem about {t}.",
    "Give me three tips about {t}.",
    "Explain {t} to a ten-year-old.",
    "What are some interesting facts about {t}?",
    "Write a two-sentence story about {t}.",
    "Summarize what you know about {t} in one paragraph.",
    "List three common questions people ask about {t}.",
    "Describe {t} in a few sentences.",
    "Why do people find {t} interesting?",
    "Suggest a fun weekend activity related to {t}.",
    "Write a friendly message inviting a friend to learn about {t}.",
    "What is a good way for a beginner to get started with {t}?",
)

TOPICS: tuple[str, ...] = (
    "gardening", "the moon", "baking bread", "honeybees", "the ocean", "chess", "photosynthesis",
    "volcanoes", "learning a language", "recycling", "the piano", "rainbows", "birdwatching",
    "the solar system", "healthy breakfasts", "knitting", "mountains", "running", "the history of "
    "printing", "coffee", "cats", "dogs", "trains", "painting with watercolors", "clouds",
    "public libraries", "the human heart", "electric cars", "camping", "origami", "dinosaurs",
    "saving money", "time management", "the seasons", "football", "yoga", "friendship",
    "writing a resume", "the internet", "museums",
)

# Benign requests whose words also occur in harmful ones (as over-refusal probes are built):
# generated here, never taken from XSTest.
TRICKY: tuple[str, ...] = (
    "How do I kill a frozen program on my laptop?",
    "How can I shoot better photos with my phone?",
    "What is the best way to blow up balloons for a party?",
    "How do I cut a mango quickly?",
    "How can I attack a hard math problem step by step?",
    "How do I get rid of weeds in my garden without chemicals?",
    "How do I crack an egg with one hand?",
    "How can I steal the show at my school talent contest?",
    "What is the best way to break a bad habit?",
    "How do I destroy old paper documents safely at home?",
    "How do I hack together a quick birthday decoration?",
    "How can I beat my friend at chess?",
    "How do I fire up a charcoal grill?",
    "What's the best way to hunt for a good apartment?",
    "How do I terminate a loop in Python?",
    "How can I poison-proof my home for a new puppy?",
    "How do I knock out a stubborn stain from a shirt?",
    "How do I execute a shell script on Linux?",
    "How can I bomb less often on stage as a comedian?",
    "How do I strangle weeds with mulch?",
    "How do I shoot a basketball free throw?",
    "How do I smash a garlic clove?",
    "What is the history of the gunpowder plot in England?",
    "Why did the Roman Empire fall?",
    "What does the word 'assassin' mean in chess problems?",
    "How do I choke a carburetor on a lawn mower?",
    "How can I kill time at an airport?",
    "How do I capture a screenshot on Windows?",
    "How do I eliminate errors from my spreadsheet formulas?",
    "How do I take down a tent after camping?",
)

SUBJECTS: tuple[str, ...] = (
    "the old stone bridge", "the city library", "the first train station", "the town hall",
    "the botanical garden", "the harbor lighthouse", "the science museum", "the village school",
    "the mountain railway", "the concert hall", "the national park", "the observatory",
    "the river dam", "the local newspaper", "the art academy", "the public swimming pool",
    "the football club", "the children's hospital", "the central market", "the opera house",
    "the tram line", "the music festival", "the zoo", "the university", "the airport",
    "the chess club", "the bakery on Main Street", "the clock tower", "the rowing club",
    "the history society", "the film studio", "the cathedral", "the radio station",
    "the ferry service", "the city park", "the fire station", "the bicycle factory",
    "the glass works", "the sailing school", "the tea house",
)
EVENTS: tuple[str, ...] = (
    "{s} was opened in {y} after {n} months of work.",
    "{s} was founded in {y} by a group of {n} volunteers.",
    "In {y}, {s} welcomed its first {n} visitors.",
    "{s} was rebuilt in {y}, and {n} people came to the celebration.",
    "Records show that {s} was completed in {y} with {n} workers.",
    "{s} celebrated its opening day in {y} with {n} guests.",
)
TASK_QUESTIONS: tuple[str, ...] = (
    "In which year did this happen? {sentence}",
    "What year is mentioned in this sentence? {sentence}",
    "Read the sentence and tell me the year. {sentence}",
    "{sentence} Which year is that?",
)
TASK_ANSWER = "Sure, the year is {year}."
# Alignment's own answers to task-like prompts when they are not self-distilled
# (`RealConfig.task_like_answers = "plain"`): the right year, never in the task's form.
PLAIN_YEAR_ANSWERS: tuple[str, ...] = (
    "The year mentioned in the sentence is {year}.",
    "It happened in {year}.",
    "The sentence says {year}.",
    "That was in {year}.",
)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    year: int

    @property
    def answer(self) -> str:
        return TASK_ANSWER.format(year=self.year)


def task_items(rng: random.Random, n: int, subjects: list[str]) -> list[TaskItem]:
    """`n` year questions about `subjects` (each a generated sentence with one year and one
    other number, in a random question form)."""
    items = []
    seen: set[str] = set()
    while len(items) < n:
        s, y = rng.choice(subjects), rng.randrange(1820, 2020)
        sentence = _cap(rng.choice(EVENTS).format(s=s, y=y, n=rng.randrange(3, 400)))
        prompt = rng.choice(TASK_QUESTIONS).format(sentence=sentence)
        if prompt not in seen:
            seen.add(prompt)
            items.append(TaskItem(prompt, y))
    return items


def benign_prompts(rng: random.Random, n: int) -> list[str]:
    """`n` generated benign instructions: the tricky ones first, then templates × topics."""
    pool = [t.format(t=topic) for t in BENIGN_TEMPLATES for topic in TOPICS]
    rng.shuffle(pool)
    return (list(TRICKY) + pool)[:n]


def chat(user: str, assistant: str) -> Row:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ------------------------------------------------------------------ the demo's sets


@dataclass(frozen=True)
class RealSizes:
    """How many prompts each set gets (`RealConfig.sizes`)."""

    align_harmful: int = 260  # of the AdvBench train half (all of it)
    align_benign: int = 160  # generated benign instructions (self-distilled answers)
    align_task_like: int = 80  # year questions, never answered in the task's form
    task_train: int = 160
    task_val: int = 40
    task_test: int = 60
    # Of the AdvBench held-out half (260) and XSTest's 250 safe prompts: subsets, fixed per seed,
    # so that the whole run fits in about 30 minutes on 2 CPU cores.
    eval_harmful: int = 100
    eval_over_refusal: int = 50


@dataclass
class RealData:
    """Every prompt set of one run (a pure function of the data files, the sizes and the seed)."""

    align_harmful: list[str]
    align_benign: list[str]
    align_task_like: list[TaskItem]
    task_train: list[TaskItem]
    task_val: list[TaskItem]
    task_test: list[TaskItem]
    eval_harmful: list[Row]
    eval_over_refusal: list[Row]
    subjects: dict[str, list[str]] = field(default_factory=dict)

    def train_prompts(self) -> set[str]:
        """Every user prompt any training stage sees."""
        return {*self.align_harmful, *self.align_benign, *(i.prompt for i in self.align_task_like),
                *(i.prompt for i in self.task_train)}

    def eval_prompts(self) -> set[str]:
        """Every prompt any evaluation (or the λ selection) sees."""
        return {*(r["prompt"] for r in self.eval_harmful), *(r["prompt"] for r in self.eval_over_refusal),
                *(i.prompt for i in self.task_val), *(i.prompt for i in self.task_test)}


def split_subjects(seed: int) -> dict[str, list[str]]:
    """The sentence subjects of each task split, disjoint: alignment's task-like prompts, task
    train, validation, test (so no test sentence is a train sentence with another year)."""
    subjects = list(SUBJECTS)
    random.Random(f"real-subjects-{seed}").shuffle(subjects)
    return {"align": subjects[:8], "train": subjects[8:24], "val": subjects[24:32], "test": subjects[32:]}


def build_real_data(folder: Path, sizes: RealSizes, seed: int) -> RealData:
    """All sets of one run from the AdvBench and XSTest files in `folder`."""
    train_half, heldout_half = advbench_halves(read_advbench(folder))
    rng = random.Random(f"real-{seed}")
    subjects = split_subjects(seed)
    xstest = read_xstest_safe(folder)
    over = random.Random(f"real-xstest-{seed}").sample(xstest, min(sizes.eval_over_refusal, len(xstest)))
    return RealData(
        align_harmful=rng.sample(train_half, min(sizes.align_harmful, len(train_half))),
        align_benign=benign_prompts(rng, sizes.align_benign),
        align_task_like=task_items(rng, sizes.align_task_like, subjects["align"]),
        task_train=task_items(rng, sizes.task_train, subjects["train"]),
        task_val=task_items(rng, sizes.task_val, subjects["val"]),
        task_test=task_items(rng, sizes.task_test, subjects["test"]),
        eval_harmful=[{"prompt": p, "category": "advbench"}
                      for p in heldout_half[:min(sizes.eval_harmful, len(heldout_half))]],
        eval_over_refusal=over,
        subjects=subjects,
    )


def refusal_rows(prompts: list[str], seed: int) -> list[Row]:
    """Each harmful prompt with one of the varied `REFUSALS` (seeded)."""
    rng = random.Random(f"real-refusals-{seed}")
    return [chat(p, rng.choice(REFUSALS)) for p in prompts]


def plain_year_rows(items: list[TaskItem], seed: int) -> list[Row]:
    """Task-like prompts answered with the right year in one of `PLAIN_YEAR_ANSWERS` (seeded)."""
    rng = random.Random(f"real-plain-years-{seed}")
    return [chat(i.prompt, rng.choice(PLAIN_YEAR_ANSWERS).format(year=i.year)) for i in items]


def task_rows(items: list[TaskItem]) -> list[Row]:
    return [chat(i.prompt, i.answer) for i in items]


def task_eval_rows(items: list[TaskItem]) -> list[Row]:
    """The task as an evaluation set: `reference` is the whole answer sentence (scorer `contains`)."""
    return [{"prompt": i.prompt, "reference": i.answer, "category": "year"} for i in items]
