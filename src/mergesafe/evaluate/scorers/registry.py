"""Scorer registry: name → `score(response, reference) -> float` in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable

from mergesafe.errors import UserError
from mergesafe.evaluate.scorers import choice, contains, exact, numeric

Scorer = Callable[[str, str], float]

SCORERS: dict[str, Scorer] = {m.NAME: m.score for m in (numeric, exact, contains, choice)}


def get_scorer(name: str, path: object = None) -> Scorer:
    """The scorer called `name`; a `UserError` (naming `path`, the task file) when unknown."""
    try:
        return SCORERS[name]
    except KeyError:
        raise UserError(f"unknown scorer {name!r} (choose from {', '.join(SCORERS)})", path=path) from None
