"""mergesafe.report: the self-contained HTML report of a sweep (plots embedded) and its PNGs.

``write_report(out, rows, recommendation, ...)`` writes ``report.html`` and ``frontier.png``;
``write_sweep_report(result)`` does it for a :class:`mergesafe.sweep.api.SweepResult`.
"""

from __future__ import annotations

from typing import Any

from mergesafe.report.examples import changed_examples, response_side
from mergesafe.report.html import write_report


def write_sweep_report(result: Any, **kwargs: Any) -> None:
    """``report.html``, ``frontier.png`` and ``examples.jsonl`` in the sweep's output folder
    (`kwargs` go to :func:`write_report`, e.g. ``comparison``)."""
    write_report(result.out, result.rows, result.recommendation, select_set=result.select_set,
                 title=result.title, inputs=result.inputs, examples=sweep_examples(result), **kwargs)


def sweep_examples(result: Any) -> list[dict[str, Any]] | None:
    """The 'what changed' rows of a sweep, from the generations its trials kept (None if not kept).

    With ``--each-post`` the first post's trials are shown."""
    from mergesafe.sweep.results import read_generations

    rows = result.seed_rows or result.rows
    first_post = next((r.get("post") for r in rows if r.get("post")), None)

    def key_of(method: str, weight: float | None = None, params: Any = None) -> str | None:
        for r in rows:
            if r["method"] != method or (r.get("post") and r.get("post") != first_post):
                continue
            if weight is not None and abs(r["weight"] - weight) > 1e-9:
                continue
            if params is not None and (r.get("params") or {}) != (params or {}):
                continue
            return r["key"]
        return None

    rec = result.recommendation
    keys = [key_of("pre"), key_of("post"), key_of(rec["method"], rec["weight"], rec.get("params"))]
    if None in keys[:2]:
        return None
    pre, post = (read_generations(result.out, k) for k in keys[:2])
    if pre is None or post is None:
        return None
    recommended = read_generations(result.out, keys[2]) if keys[2] else None
    return changed_examples(pre, post, recommended)


__all__ = ["changed_examples", "response_side", "sweep_examples", "write_report", "write_sweep_report"]
