"""mergesafe.report: the self-contained HTML report of a sweep (plots embedded) and its PNGs.

``write_report(out, rows, recommendation, ...)`` writes ``report.html`` and ``frontier.png``;
``write_sweep_report(result)`` does it for a :class:`mergesafe.sweep.api.SweepResult`.
"""

from __future__ import annotations

from typing import Any

from mergesafe.report.html import write_report


def write_sweep_report(result: Any) -> None:
    """``report.html`` and ``frontier.png`` in the sweep's output folder."""
    write_report(result.out, result.rows, result.recommendation, select_set=result.select_set,
                 title=result.title, inputs=result.inputs)


__all__ = ["write_report", "write_sweep_report"]
