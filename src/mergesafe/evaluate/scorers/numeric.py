"""`numeric`: GSM8K-style scoring.  The reference's answer is the number after `####` (else its
last number); the response's answer is the last number in it.  Numbers compare as decimals, so
`1,000`, `1000` and `1000.0` are equal, and `$18.` reads as 18.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NAME = "numeric"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(.+)")


def to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def last_number(text: str) -> Decimal | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    return to_decimal(found[-1]) if found else None


def reference_number(reference: str) -> Decimal | None:
    """The answer of a GSM8K reference: what follows `####`, else the last number."""
    m = _FINAL.search(reference)
    if m:
        num = _NUMBER.search(m.group(1))
        if num:
            return to_decimal(num.group(0))
    return last_number(reference)


def score(response: str, reference: str) -> float:
    ref = reference_number(reference)
    got = last_number(response)
    return float(ref is not None and got is not None and got == ref)
