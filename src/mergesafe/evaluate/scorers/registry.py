"""Scorer registry: a task scorer is one module here plus one line in `_MODULES` below.

A scorer module declares:

    NAME = "numeric"                 # the --scorer value
    NEEDS_REFERENCE = True           # optional (default True): the set must have a reference column
    REQUIRED_FIELDS = ()             # optional: other fields every row must have; they are kept in
                                     #   `PromptRow.fields` (only for sets whose scorer asks)

and exactly one of

    def score(response: str, reference: str) -> float
        # one response at a time; `reference` is "" when NEEDS_REFERENCE is False
    def score_batch(rows: Sequence[PromptRow], responses: Sequence[str], config: EvalConfig)
            -> list[float] | list[dict]
        # all responses of one set at once (a model to load, processes to run); rows[i] is the
        # prompt row of responses[i] (a row appears once per sample, in row-major order);
        # `config` carries the scorer's options (e.g. `config.bertscore_model`).  It returns a
        # score in [0, 1] per response, or a dict per response with key "score" and extra keys
        # copied into that response's generations.jsonl row (e.g. humaneval's "result").

and optionally

    def set_metrics(scores: list[list[float]], config: EvalConfig) -> dict
        # scores[i] = the scores of row i's samples; keys merged over the set's metrics.json entry
        # (humaneval: "score" = pass@(first k), "pass@K" for every K).  Without it, the entry's
        # "score" is the mean over every sample of every row.
    def check_config(config: EvalConfig, path: Path) -> None
        # called once when the set is loaded: raise UserError for options this scorer cannot use

A module must import heavy packages (bert_score, ...) inside its functions, not at module level:
every scorer module is imported whenever `mergesafe.evaluate` is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mergesafe.errors import UserError
from mergesafe.evaluate.scorers import choice, contains, exact, humaneval, numeric
from mergesafe.evaluate.scorers import bertscore

if TYPE_CHECKING:
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.prompts import PromptRow

# ----------------------------------------------------------------------------- the registry line
_MODULES: tuple[ModuleType, ...] = (numeric, exact, contains, choice, bertscore, humaneval)

Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class ScorerSpec:
    """What `load_eval_sets` and `score_responses` need to know about one scorer module."""

    name: str
    module: ModuleType
    needs_reference: bool
    required_fields: tuple[str, ...]

    @property
    def is_batch(self) -> bool:
        return hasattr(self.module, "score_batch")

    def __call__(self, response: str, reference: str) -> float:
        """The per-response scorer (only for modules that define `score`)."""
        return float(self.module.score(response, reference))

    def check_config(self, config: EvalConfig, path: Path | None = None) -> None:
        check = getattr(self.module, "check_config", None)
        if check is not None:
            check(config, path)

    def score_rows(self, rows: Sequence[PromptRow], responses: Sequence[str],
                   config: EvalConfig) -> list[dict[str, Any]]:
        """One dict per response: {"score": float, ...extra generations.jsonl keys}."""
        if len(rows) != len(responses):
            raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
        if not self.is_batch:
            return [{"score": self(resp, r.reference or "")} for r, resp in zip(rows, responses)]
        got = list(self.module.score_batch(rows, responses, config))
        if len(got) != len(responses):
            raise RuntimeError(f"scorer {self.name} returned {len(got)} scores for {len(responses)} responses")
        return [dict(g) if isinstance(g, dict) else {"score": float(g)} for g in got]

    def set_metrics(self, scores: list[list[float]], config: EvalConfig) -> dict[str, Any]:
        hook = getattr(self.module, "set_metrics", None)
        return dict(hook(scores, config)) if hook is not None else {}


def _spec(module: ModuleType) -> ScorerSpec:
    if hasattr(module, "score") == hasattr(module, "score_batch"):
        raise TypeError(f"scorer module {module.__name__} must define exactly one of score, score_batch")
    return ScorerSpec(name=module.NAME, module=module,
                      needs_reference=bool(getattr(module, "NEEDS_REFERENCE", True)),
                      required_fields=tuple(getattr(module, "REQUIRED_FIELDS", ())))


SCORER_SPECS: dict[str, ScorerSpec] = {m.NAME: _spec(m) for m in _MODULES}
# The per-response scorers as plain callables `score(response, reference) -> float`.
SCORERS: dict[str, Scorer] = {n: s for n, s in SCORER_SPECS.items() if not s.is_batch}


def scorer_names() -> list[str]:
    return list(SCORER_SPECS)


def get_scorer(name: str, path: object = None) -> ScorerSpec:
    """The scorer called `name`; a `UserError` (naming `path`, the task file) when unknown."""
    try:
        return SCORER_SPECS[name]
    except KeyError:
        raise UserError(f"unknown scorer {name!r} (choose from {', '.join(SCORER_SPECS)})",
                        path=path) from None
