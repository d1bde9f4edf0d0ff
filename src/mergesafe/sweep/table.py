"""The sweep's end-of-run table (rich): every trial, the front marked, the pick highlighted."""

from __future__ import annotations

from typing import Any

from mergesafe.sweep.selection import mean_asr, mean_refusal, task_score


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def print_sweep(result: Any, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    front = {r.get("key") for r in result.front}
    rec = result.recommendation
    table = Table(title="mergesafe sweep (ASR, over-refusal and task in %; ◆ = Pareto front)")
    for col in ("method", "λ", "ASR", "over-refusal", "task" + (f" ({result.select_set})" if result.select_set else ""), ""):
        table.add_column(col, justify="right" if col not in ("method", "") else "left")
    order = {"pre": 0, "post": 2}
    for r in sorted(result.rows, key=lambda r: (order.get(r["method"], 1), r["method"], r["weight"])):
        pick = r.get("key") == rec.get("key")
        mark = ("◆ " if r.get("key") in front else "") + ("← recommended" if pick else "")
        table.add_row(r["method"], f"{r['weight']:g}", _pct(mean_asr(r)), _pct(mean_refusal(r)),
                      _pct(task_score(r, result.select_set)), mark, style="bold yellow" if pick else None)
    console.print(table)
    console.print(f"[bold]Recommended:[/bold] {rec['method']} λ={rec['weight']:g} — {rec['reason']}")
