"""`mergesafe compare` / `mergesafe demo --compare`: the related safety-restoration methods beside
the pre/post merge, on the miniature world, judged on the same held-out sets.

Rows (each evaluated once with the demo's evaluation settings):

* ``pre`` and ``post``, and the sweep's recommended pre/post merge;
* ``safe_lora``  (Hsu et al. 2024): post's update projected onto the alignment subspace of
  pre − unaligned in the 10 layers of lowest cosine;
* ``safemerge``  (Djuhera et al. 2025): layers below cosine 0.35 blended 0.8/0.2 with a safety
  adapter's update;
* ``resta``      (Bhardwaj et al. 2024): pre + (post − pre) + 0.5·(pre − harmful);
* ``lox``        (Perin et al. 2025): pre hardened (rank 6, α = 0.5), then fine-tuned on the task
  with post's budget;
* ``ema``        (Kim et al. 2025): the task fine-tune with an EMA in parameter space (β = 0.99).

The world provides the extra inputs: the unaligned model is stage 0; the safety adapter is a
LoRA of pre trained on stage 1's chat (refusals and helpful answers); the harmful model is pre
fully fine-tuned on stage 0's placeholder compliance with harmful requests.  Those two are
cached with stages 0-1.  Methods run at their default settings (the LoX and EMA settings, which
have no default in mergesafe, are the world's choices above).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.world.config import StageBudget, WorldConfig
from mergesafe.world.data import WorldData
from mergesafe.world.stages import Base, run_stage


@dataclass(frozen=True)
class CompareSettings:
    """Settings of the comparison's extra models and methods."""

    safety_adapter: StageBudget = StageBudget(learning_rate=2e-3, max_steps=60, batch_size=16)
    safety_rows: int = 400
    harmful: StageBudget = StageBudget(learning_rate=3e-4, max_steps=40, batch_size=8)
    harmful_rows: int = 200
    lox_rank: int = 6
    lox_coef: float = 0.5
    ema_beta: float = 0.99


@dataclass
class Extras:
    """The extra inputs the related methods need (cached with stages 0-1)."""

    unaligned: Path
    safety_adapter: Path
    harmful: Path


@dataclass
class CompareRow:
    method: str
    asr: float
    over_refusal: float
    task: float
    extra_inputs: str
    extra_training: str
    merge_seconds: float | None
    details: dict[str, Any] = field(default_factory=dict)


def build_extras(base: Base, data: WorldData, settings: CompareSettings, seed: int, *,
                 progress: bool) -> Extras:
    """The safety adapter and the harmful model beside the cached pre (built once per base)."""
    folder = base.pre.parent
    safety, harmful = folder / "safety_adapter", folder / "harmful"
    if not (safety / "adapter_config.json").is_file():
        run_stage(base.pre, data.safety_rows(settings.safety_rows, seed), safety, settings.safety_adapter,
                  lora=True, description="safety adapter (LoRA of pre on refusal data)", seed=seed,
                  progress=progress)
    if not (harmful / "config.json").is_file():
        run_stage(base.pre, data.harmful_compliance_rows(settings.harmful_rows, seed), harmful,
                  settings.harmful, lora=False, description="harmful model (pre tuned to comply)",
                  seed=seed, progress=progress)
    return Extras(unaligned=base.stage0, safety_adapter=safety, harmful=harmful)


def run_compare(work: Path, data: WorldData, cfg: WorldConfig, base: Base, pre: Path, post: Path,
                rows: list[dict[str, Any]], recommendation: dict[str, Any], evaluate_path,
                metrics_of, *, seed: int, lora: bool, progress: bool,
                settings: CompareSettings | None = None) -> list[CompareRow]:
    """Build, evaluate and tabulate every method; writes `work/compare/*` and returns the rows.

    `evaluate_path(model_dir, eval_dir, adapter=None) -> metrics` evaluates one model (with a
    LoRA adapter on it when given) with the demo's settings;
    `metrics_of(sweep_row_or_metrics) -> {"asr", "task", "over_refusal"}` reads the figures.
    """
    from mergesafe.api import merge
    from mergesafe.restore.harden import harden

    s = settings or CompareSettings()
    folder = work / "compare"
    folder.mkdir(parents=True, exist_ok=True)
    extras = build_extras(base, data, s, seed, progress=progress)
    post_budget = cfg.post_lora if lora else cfg.post_full
    post_kw = dict(lora=True, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha) if lora else dict(lora=False)
    out: list[CompareRow] = []

    def by_method(method: str) -> dict[str, Any]:
        return next(r for r in rows if r["method"] == method)

    out.append(CompareRow("pre", **metrics_of(by_method("pre")), extra_inputs="–",
                          extra_training="–", merge_seconds=None))
    out.append(CompareRow("post", **metrics_of(by_method("post")), extra_inputs="–",
                          extra_training="–", merge_seconds=None))

    rec_row = next(r for r in rows if r.get("key") == recommendation.get("key"))
    t = time.perf_counter()
    rec_dir = merge(pre, post, folder / "best_merge", method=rec_row["method"] if rec_row["method"] not in
                    ("pre", "post") else "linear", weight=float(rec_row["weight"]),
                    params=rec_row.get("params") or {}, seed=seed, overwrite=True)
    rec_secs = time.perf_counter() - t
    out.append(CompareRow(f"pre/post merge ({rec_row['method']} λ={float(rec_row['weight']):g})",
                          **metrics_of(rec_row), extra_inputs="–", extra_training="–",
                          merge_seconds=round(rec_secs, 2), details={"path": str(rec_dir)}))

    merges = (
        ("safe_lora", dict(unaligned=extras.unaligned), "unaligned", "–"),
        ("safemerge", dict(unaligned=extras.unaligned, safety_adapter=extras.safety_adapter),
         "unaligned, safety adapter", "safety adapter"),
        ("resta", dict(harmful=extras.harmful), "harmful model", "harmful model"),
    )
    for method, kw, inputs, training in merges:
        t = time.perf_counter()
        model_dir = merge(pre, post, folder / method, method=method, seed=seed, overwrite=True, **kw)
        secs = time.perf_counter() - t
        m = evaluate_path(model_dir, folder / f"{method}.eval")
        out.append(CompareRow(method, **metrics_of(m), extra_inputs=inputs, extra_training=training,
                              merge_seconds=round(secs, 2), details=_manifest_details(model_dir)))

    t = time.perf_counter()
    hardened = harden(pre, extras.unaligned, folder / "lox_hardened", s.lox_rank, s.lox_coef,
                      overwrite=True)
    secs = time.perf_counter() - t
    lox_post = run_stage(hardened, data.stage2, folder / "lox_post", post_budget, seed=seed,
                         description="LoX: task fine-tune of the hardened pre", progress=progress,
                         **post_kw)
    m = (evaluate_path(hardened, folder / "lox.eval", lox_post) if lora
         else evaluate_path(lox_post, folder / "lox.eval"))
    out.append(CompareRow("lox", **metrics_of(m), extra_inputs="unaligned",
                          extra_training="task fine-tune of hardened pre",
                          merge_seconds=round(secs, 2),
                          details={"rank": s.lox_rank, "coef": s.lox_coef}))

    ema_run = run_stage(pre, data.stage2, folder / "ema_post", post_budget, seed=seed,
                        description=f"EMA: task fine-tune with β={s.ema_beta}", progress=progress,
                        ema=s.ema_beta, **post_kw)
    m = (evaluate_path(pre, folder / "ema.eval", ema_run / "ema") if lora
         else evaluate_path(ema_run / "ema", folder / "ema.eval"))
    out.append(CompareRow("ema", **metrics_of(m), extra_inputs="–",
                          extra_training="EMA during the task fine-tune",
                          merge_seconds=None, details={"beta": s.ema_beta}))
    return out


def _manifest_details(model_dir: Path) -> dict[str, Any]:
    """What the method chose, from the output's manifest: its parameters and, for Safe LoRA and
    SafeMERGE, how many of the layers it projected or blended."""
    try:
        manifest = json.loads((Path(model_dir) / "mergesafe.json").read_text())
    except (OSError, ValueError):
        return {}
    details: dict[str, Any] = {"params": manifest.get("params", {})}
    for method, key in (("safe_lora", "selected"), ("safemerge", "merged")):
        part = manifest.get(method)
        if isinstance(part, dict) and key in part:
            details[f"layers_{'projected' if method == 'safe_lora' else 'blended'}"] = len(part[key])
            details["layers"] = len(part.get("cosines", {}))
    return details


def write_compare_json(rows: list[CompareRow], path: Path, *, seed: int, quick: bool,
                       settings: CompareSettings | None = None) -> Path:
    s = settings or CompareSettings()
    payload = {"seed": seed, "quick": quick,
               "settings": {"lox_rank": s.lox_rank, "lox_coef": s.lox_coef, "ema_beta": s.ema_beta},
               "rows": [asdict(r) for r in rows]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_compare(console, rows: list[CompareRow]) -> None:
    from rich.table import Table

    table = Table(title="related methods on the same held-out sets")
    for col in ("method", "ASR ↓", "over-ref. ↓", "task ↑", "extra inputs", "extra training", "merge s"):
        table.add_column(col, justify="left" if col in ("method", "extra inputs", "extra training") else "right")
    for r in rows:
        table.add_row(r.method, f"{r.asr:.3f}", f"{r.over_refusal:.3f}", f"{r.task:.3f}", r.extra_inputs,
                      r.extra_training, "–" if r.merge_seconds is None else f"{r.merge_seconds:.2f}")
    console.print(table)
