"""`exact`: the response equals the reference after normalisation (case, whitespace, end punctuation)."""

from __future__ import annotations

from mergesafe.evaluate.scorers.base import normalize

NAME = "exact"


def score(response: str, reference: str) -> float:
    return float(normalize(response) == normalize(reference))
