"""`contains`: the normalised reference occurs in the normalised response."""

from __future__ import annotations

from mergesafe.evaluate.scorers.base import normalize

NAME = "contains"


def score(response: str, reference: str) -> float:
    ref = normalize(reference)
    return float(bool(ref) and ref in normalize(response))
