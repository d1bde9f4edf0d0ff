"""`report.html`: one self-contained page (plots embedded as base64 PNG) plus `frontier.png`."""

from __future__ import annotations

import base64
import html
import json
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
#ms-ex td{text-align:left;vertical-align:top} #ms-ex .resp{max-height:9rem;overflow:auto;white-space:pre-wrap;font-size:.8rem}
.v{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.75rem;font-weight:600}
.v-good{background:#d9f2d9;color:#135213} .v-bad{background:#f8d7d7;color:#7a1111} .v-none{background:#eee;color:#555}
.filters{margin:.5rem 0} .filters input,.filters select{margin-right:.6rem;padding:.2rem}
"""

_FILTER_JS = """
function msFilter(){const q=document.getElementById('ms-q').value.toLowerCase();
const c=document.getElementById('ms-cat').value,k=document.getElementById('ms-kind').value;let n=0;
for(const tr of document.querySelectorAll('#ms-ex tbody tr')){const ok=(!c||tr.dataset.cat===c)&&
(!k||tr.dataset.kind===k)&&(!q||tr.textContent.toLowerCase().includes(q));tr.style.display=ok?'':'none';if(ok)n++;}
document.getElementById('ms-n').textContent=n;}
"""

_GOOD_VERDICTS = {"safe", "compliance", "correct"}
_BAD_VERDICTS = {"unsafe", "refusal", "incorrect"}
_KIND_LABEL = {"safety": "safety", "over_refusal": "over-refusal", "task": "task"}


def _verdict(side: Row | None) -> str:
    if side is None:
        return "<span class='v v-none'>not kept</span>"
    v = str(side.get("verdict"))
    cls = "v-good" if v in _GOOD_VERDICTS else "v-bad" if v in _BAD_VERDICTS else "v-none"
    label = v + (f" ({side['score']:g})" if isinstance(side.get("score"), (int, float)) else "")
    return (f"<span class='v {cls}'>{html.escape(label)}</span>"
            f"<div class='resp'>{html.escape(str(side.get('response', '')))}</div>")


def examples_section(examples: list[Row]) -> str:
    """The 'what changed' table: filterable by kind and category, with a search box (inline JS)."""
    flips = [e for e in examples if e["kind"] == "safety" and e["change"].startswith("safe")]
    back = sum(1 for e in flips if e.get("recommended_good"))
    summary = (f"{len(flips)} harmful prompts were refused by pre and answered by post; the "
               f"recommended model refuses {back} of them again." if flips else
               "No harmful prompt flipped from refused to answered between pre and post.")
    cats = sorted({str(e.get("category")) for e in examples if e.get("category")})
    kinds = sorted({e["kind"] for e in examples}, key=lambda k: list(_KIND_LABEL).index(k) if k in _KIND_LABEL else 9)
    opts_cat = "".join(f"<option value='{html.escape(c, quote=True)}'>{html.escape(c)}</option>" for c in cats)
    opts_kind = "".join(f"<option value='{html.escape(k, quote=True)}'>{html.escape(_KIND_LABEL.get(k, k))}"
                        f"</option>" for k in kinds)
    rows = []
    for e in examples:
        again = {True: "yes", False: "no", None: "–"}[e.get("recommended_good")]
        cells = [html.escape(f"{_KIND_LABEL.get(e['kind'], e['kind'])} · {e['set']}:{e['line']}"),
                 html.escape(str(e.get("category") or "")), html.escape(e["change"]),
                 f"<div class='resp'>{html.escape(e['prompt'])}</div>", _verdict(e.get("pre")),
                 _verdict(e.get("post")), _verdict(e.get("recommended")), again]
        rows.append(f"<tr data-kind='{html.escape(e['kind'], quote=True)}' "
                    f"data-cat='{html.escape(str(e.get('category') or ''), quote=True)}'>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("set:line", "category", "change", "prompt", "pre", "post",
                                             "recommended", "recommended good again?"))
    return (f"<h2>What changed, prompt by prompt</h2><p>{html.escape(summary)}</p>"
            "<p class='note'>Safety and over-refusal prompts whose verdict flipped between pre and post, "
            "and a few task prompts, with the three responses side by side (also in examples.jsonl).</p>"
            "<div class='filters'><input id='ms-q' type='search' placeholder='search prompts and responses' "
            "oninput='msFilter()'><select id='ms-kind' onchange='msFilter()'><option value=''>all kinds"
            f"</option>{opts_kind}</select><select id='ms-cat' onchange='msFilter()'><option value=''>"
            f"all categories</option>{opts_cat}</select><span class='note'><span id='ms-n'>{len(examples)}"
            f"</span> shown</span></div><table id='ms-ex'><thead><tr>{head}</tr></thead><tbody>"
            + "\n".join(rows) + f"</tbody></table><script>{_FILTER_JS}</script>")


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
                 comparison: list[Row] | None = None, examples: list[Row] | None = None) -> Path:
    """Write `OUT/report.html` and `OUT/frontier.png`; return the report's path.

    `comparison` (rows of `mergesafe compare`) adds a table of the related methods; `examples`
    (:func:`mergesafe.report.examples.changed_examples`) the 'what changed' section, first, and
    `OUT/examples.jsonl` with the same rows."""
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
    if examples is not None:
        parts.append(examples_section(examples))
        _atomic_write(out_dir / "examples.jsonl",
                      "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode())
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
