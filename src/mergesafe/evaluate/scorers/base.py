"""Shared text normalisation for the task scorers."""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-fold, collapse whitespace, strip surrounding whitespace and trailing punctuation."""
    return _WS.sub(" ", text.casefold()).strip().strip(" .,;:!?\"'")
