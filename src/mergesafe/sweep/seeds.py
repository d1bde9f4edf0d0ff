"""Several fine-tuning seeds evaluated one by one (`sweep --each-post`): their mean per (method, λ).

The paper fine-tunes with three seeds and reports the mean over them.  With `--each-post` every
post is merged with pre and evaluated on its own (one trial per (post, method, λ), each its own
row of `results.jsonl`, keyed exactly as a one-post sweep of that post), and the front, the
recommendation and the report use the mean over the posts of each (method, λ):

    rate(method, λ) = (1 / S) · Σ_s rate_s(method, λ)      for ASR, over-refusal and task scores

with counts (`n`, `unsafe`, ...) summed and the spread over seeds given as `std` (population
standard deviation) beside each mean.  Pre does not depend on the posts: it is one row.
"""

from __future__ import annotations

import hashlib
import json
from statistics import fmean, pstdev
from typing import Any

Row = dict[str, Any]

RATES = ("asr", "rate", "score")
COUNTS = ("n", "unparsed", "unsafe", "refusals", "correct", "total")


def _mean_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics entry (a set's, or a category's) averaged over seeds."""
    out: dict[str, Any] = {}
    for key in RATES:
        values = [float(e[key]) for e in entries if isinstance(e.get(key), (int, float))]
        if values:
            out[key] = fmean(values)
            out[f"{key}_std"] = pstdev(values) if len(values) > 1 else 0.0
    for key in COUNTS:
        if all(isinstance(e.get(key), (int, float)) for e in entries):
            out[key] = sum(e[key] for e in entries)
    for key in ("scorer",):
        if key in entries[0]:
            out[key] = entries[0][key]
    cats = sorted({c for e in entries for c in (e.get("categories") or {})})
    if cats:
        out["categories"] = {c: _mean_entry([e["categories"][c] for e in entries if c in (e.get("categories") or {})])
                             for c in cats}
    return out


def _mean_kind(rows: list[Row], kind: str) -> dict[str, Any]:
    names = list(dict.fromkeys(n for r in rows for n in (r.get(kind) or {})))
    return {n: _mean_entry([r[kind][n] for r in rows if n in (r.get(kind) or {})]) for n in names}


def mean_over_posts(rows: list[Row]) -> list[Row]:
    """Per-seed rows → one row per (method, λ, params), in first-seen order, metrics averaged."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        ident = json.dumps([r["method"], r["weight"], r.get("params") or {}], sort_keys=True)
        groups.setdefault(ident, []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        keys = sorted(r["key"] for r in group)
        out.append({
            "method": first["method"], "weight": first["weight"], "params": first.get("params") or {},
            "safety": _mean_kind(group, "safety"), "over_refusal": _mean_kind(group, "over_refusal"),
            "task": _mean_kind(group, "task"), "seed": first.get("seed"),
            "key": hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16],
            "posts": [r.get("post") for r in group], "post_keys": keys,
        })
    return out
