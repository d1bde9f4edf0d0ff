"""`report.html`: one self-contained page (plots embedded as base64 PNG) plus `frontier.png`."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from mergesafe.report.plots import by_weight_figure, category_figure, frontier_figure, png_bytes
from mergesafe.sweep.selection import mean_asr, pareto_front, task_score

Row = dict[str, Any]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.rec{background:#fff8dc;border:1px solid #e6c200;padding:.8rem 1rem;border-radius:6px}
table{border-collapse:collapse;font-size:.85rem;width:100%} th,td{padding:.3rem .5rem;border-bottom:1px solid #eee;text-align:right}
th{background:#f4f4f4;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
tr.pick td{background:#fff3b0;font-weight:600} tr.front td:first-child::after{content:" ◆";color:#555}
img{max-width:100%} .note{color:#666;font-size:.85rem}
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(rows: list[Row], front_keys: set[str], rec: dict[str, Any] | None) -> str:
    safety = sorted({s for r in rows for s in (r.get("safety") or {})})
    refusal = sorted({s for r in rows for s in (r.get("over_refusal") or {})})
    tasks = sorted({s for r in rows for s in (r.get("task") or {})})
    head = (["method", "λ", "params"] + [f"ASR {s}" for s in safety]
            + [f"over-refusal {s}" for s in refusal] + [f"task {s}" for s in tasks])
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    order = {"pre": 0, "post": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 1), r["method"], r["weight"])):
        cls = []
        if rec is not None and r.get("key") == rec.get("key"):
            cls.append("pick")
        if r.get("key") in front_keys:
            cls.append("front")
        params = ", ".join(f"{k}={v}" for k, v in sorted((r.get("params") or {}).items()))
        cells = [r["method"], f"{r['weight']:g}", params]
        cells += [_pct((r.get("safety") or {}).get(s, {}).get("asr")) for s in safety]
        cells += [_pct((r.get("over_refusal") or {}).get(s, {}).get("rate")) for s in refusal]
        cells += [_pct((r.get("task") or {}).get(s, {}).get("score")) for s in tasks]
        out.append(f'<tr class="{" ".join(cls)}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


COMPARISON_COLUMNS = (("method", "method"), ("asr", "ASR"), ("over_refusal", "over-refusal"),
                      ("task", "task"), ("extra_inputs", "extra inputs"),
                      ("extra_training", "extra training"), ("merge_seconds", "merge s"))


def comparison_table(rows: list[Row]) -> str:
    """The related-methods table (`mergesafe compare`): one row per method."""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COMPARISON_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for key, _ in COMPARISON_COLUMNS:
            v = r.get(key)
            if key in ("asr", "over_refusal", "task"):
                cells.append(_pct(v))
            elif key == "merge_seconds":
                cells.append("–" if v is None else f"{v:.2f}")
            else:
                cells.append(html.escape(str(v)))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(out_dir: Path, rows: list[Row], rec: dict[str, Any] | None, *,
                 select_set: str | None = None, title: str = "mergesafe sweep",
                 inputs: dict[str, Any] | None = None,
                 comparison: list[Row] | None = None) -> Path:
    """Write `OUT/report.html` and `OUT/frontier.png`; return the report's path.

    `comparison` (rows of `mergesafe compare`) adds a table of the related methods."""
    out_dir = Path(out_dir)
    front = pareto_front(rows, select_set)
    front_keys = {r.get("key") for r in front}
    frontier = png_bytes(frontier_figure(rows, front, rec, select_set))
    _atomic_write(out_dir / "frontier.png", frontier)
    by_weight = png_bytes(by_weight_figure(rows, select_set))
    cat_fig = category_figure(rows, rec)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if inputs:
        parts.append("<p class='note'>" + " · ".join(f"<b>{html.escape(k)}</b>: {html.escape(str(v))}"
                                                     for k, v in inputs.items()) + "</p>")
    if rec is not None:
        pick = next((r for r in rows if r.get("key") == rec.get("key")), None)
        figures = ""
        if pick is not None:
            figures = (f" — mean ASR {_pct(mean_asr(pick))}, task score "
                       f"{_pct(task_score(pick, select_set))}")
        parts.append(f"<div class='rec'><b>Recommended:</b> {html.escape(rec['method'])} with λ = "
                     f"{rec['weight']:g}{html.escape(figures)}<br><span class='note'>"
                     f"{html.escape(rec['reason'])}</span></div>")
    parts.append("<h2>Safety vs task</h2>" + _img(frontier, "safety versus task front"))
    parts.append("<p class='note'>Lines join the merges of one method in λ order (labels are λ); "
                 "the dashed line is the Pareto front over (task ↑, ASR ↓, over-refusal ↓).</p>")
    parts.append("<h2>Metrics against λ</h2>" + _img(by_weight, "metrics against merge weight"))
    if cat_fig is not None:
        parts.append("<h2>ASR by category</h2>" + _img(png_bytes(cat_fig), "ASR by category"))
    if comparison:
        parts.append("<h2>Related methods</h2><p class='note'>The same held-out sets; each method "
                     "at its default settings (see compare.json).</p>" + comparison_table(comparison))
    parts.append("<h2>All trials</h2><p class='note'>◆ = on the Pareto front; highlighted = "
                 "recommended.</p>" + _table(rows, front_keys, rec))
    parts.append("</body></html>")
    path = out_dir / "report.html"
    _atomic_write(path, "\n".join(parts).encode())
    return path
