"""Matplotlib figures of a sweep: the safety/task front, metrics against λ, per-category ASR."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mergesafe.sweep.selection import mean_asr, mean_refusal, task_score  # noqa: E402

Row = dict[str, Any]
_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f", "#d62728", "#aec7e8"]


def _method_colors(rows: list[Row]) -> dict[str, str]:
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("pre", "post")]
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}


def _is(row: Row, rec: dict[str, Any] | None) -> bool:
    return rec is not None and row.get("key") == rec.get("key")


def frontier_figure(rows: list[Row], front: list[Row], rec: dict[str, Any] | None,
                    select_set: str | None = None) -> plt.Figure:
    """Task score (↑) against mean ASR (↓): every trial, pre, post, the front and the pick."""
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    colors = _method_colors(rows)
    for method, color in colors.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["weight"])
        xs = [mean_asr(r) or 0.0 for r in pts]
        ys = [task_score(r, select_set) or 0.0 for r in pts]
        ax.plot(xs, ys, "-o", color=color, alpha=0.75, ms=5, lw=1.2, label=method)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"{r['weight']:g}", (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=color)
    fx = [mean_asr(r) or 0.0 for r in front]
    fy = [task_score(r, select_set) or 0.0 for r in front]
    if len(front) > 1:
        ax.step(fx, fy, where="post", ls="--", color="#444", lw=1, alpha=0.6, label="Pareto front")
    for method, marker, color in (("pre", "s", "black"), ("post", "^", "#d62728")):
        for r in rows:
            if r["method"] == method:
                x, y = mean_asr(r) or 0.0, task_score(r, select_set) or 0.0
                ax.scatter([x], [y], marker=marker, s=90, color=color, zorder=5, label=method)
                ax.annotate(method, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=9,
                            weight="bold", color=color)
    for r in rows:
        if _is(r, rec):
            ax.scatter([mean_asr(r) or 0.0], [task_score(r, select_set) or 0.0], marker="*", s=320,
                       color="gold", edgecolor="black", zorder=6,
                       label=f"recommended: {r['method']} λ={r['weight']:g}")
    ax.set_xlabel("attack success rate (mean over safety sets, lower is safer)")
    ax.set_ylabel("task score" + (f" ({select_set})" if select_set else " (mean over task sets)"))
    ax.set_title("Safety vs task: pre, post and their merges")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def by_weight_figure(rows: list[Row], select_set: str | None = None) -> plt.Figure:
    """ASR, task score and over-refusal against λ, one line per method (pre at 0, post at 1)."""
    has_refusal = any(r.get("over_refusal") for r in rows)
    panels = [("attack success rate", mean_asr), ("task score", lambda r: task_score(r, select_set))]
    if has_refusal:
        panels.append(("over-refusal rate", mean_refusal))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110)
    pre = next((r for r in rows if r["method"] == "pre"), None)
    post = next((r for r in rows if r["method"] == "post"), None)
    for ax, (title, fn) in zip(axes, panels):
        for method, color in _method_colors(rows).items():
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["weight"])
            if pre is not None:
                pts = [pre, *pts]
            if post is not None:
                pts = [*pts, post]
            ax.plot([r["weight"] for r in pts], [fn(r) or 0.0 for r in pts], "-o", ms=4, color=color,
                    label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("λ (0 = pre, 1 = post)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def category_figure(rows: list[Row], rec: dict[str, Any] | None) -> plt.Figure | None:
    """Per-category ASR of pre, post and the recommended merge, for each safety set with categories."""
    picks = [r for r in rows if r["method"] in ("pre", "post") or _is(r, rec)]
    sets = sorted({s for r in picks for s, v in (r.get("safety") or {}).items() if v.get("categories")})
    if not sets:
        return None
    fig, axes = plt.subplots(len(sets), 1, figsize=(8, 3.2 * len(sets)), dpi=110, squeeze=False)
    for ax, name in zip(axes[:, 0], sets):
        cats = sorted({c for r in picks for c in ((r.get("safety") or {}).get(name, {}).get("categories") or {})},
                      key=_natural)
        width = 0.8 / max(1, len(picks))
        for i, r in enumerate(picks):
            entry = (r.get("safety") or {}).get(name, {}).get("categories") or {}
            vals = [float(entry.get(c, {}).get("asr") or 0.0) for c in cats]
            label = r["method"] if r["method"] in ("pre", "post") else f"recommended ({r['method']} λ={r['weight']:g})"
            ax.bar([j + i * width for j in range(len(cats))], vals, width=width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))])
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ASR")
        ax.set_title(f"ASR by category: {name}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png_bytes(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _natural(text: str) -> list:
    """Sort key that puts category_2 before category_10."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]
