"""`choice`: multiple choice.  The reference is a letter (`B`, `(B)`, `B) text`); the response's
letter is, in order of preference: the last "answer is X" / "Answer: X"; a reply that starts with
the letter ("B", "(B) ...", "B. ...", not the pronoun "I ..."); else the last parenthesised letter "(X)".
"""

from __future__ import annotations

import re

NAME = "choice"
_LETTERS = "A-J"
_ANSWER_IS = re.compile(rf"answer(?:\s+is)?\s*[:\-]?\s*\(?([{_LETTERS}])\b\)?", re.IGNORECASE)
_LEADING = re.compile(rf"^\(?([{_LETTERS}])(?:[).:,]|$)")
_PAREN = re.compile(rf"\(([{_LETTERS}])\)")


def reference_letter(reference: str) -> str | None:
    m = _LEADING.match(reference.strip())
    return m.group(1).upper() if m else None


def response_letter(response: str) -> str | None:
    text = response.strip()
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].upper()
    m = _LEADING.match(text)
    if m:
        return m.group(1).upper()
    found = _PAREN.findall(text)
    return found[-1].upper() if found else None


def score(response: str, reference: str) -> float:
    ref = reference_letter(reference)
    got = response_letter(response)
    return float(ref is not None and got == ref)
