"""`mergesafe.sweep(...)`: methods × λ, evaluated in memory, with resume, front, pick and report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError
from mergesafe.sweep.grid import check_grid
from mergesafe.sweep.results import ResultsStore, fingerprint, trial_key
from mergesafe.sweep.selection import mean_asr, pareto_front, recommend, task_score

Row = dict[str, Any]


@dataclass
class SweepResult:
    rows: list[Row]
    recommendation: dict[str, Any]
    front: list[Row]
    out: Path
    select_set: str | None = None
    computed: int = 0
    reused: int = 0
    best_model: Path | None = None
    notes: list[str] = field(default_factory=list)
    title: str = "mergesafe sweep"
    inputs: dict[str, str] = field(default_factory=dict)  # for the report: pre, post, judge

    def row(self, method: str, weight: float | None = None) -> Row | None:
        for r in self.rows:
            if r["method"] == method and (weight is None or abs(r["weight"] - weight) < 1e-9):
                return r
        return None

    @property
    def recommended_row(self) -> Row:
        return next(r for r in self.rows if r.get("key") == self.recommendation.get("key"))


def _eval_settings(config: Any) -> dict[str, Any]:
    """Everything of the evaluation that changes the numbers (files by fingerprint)."""
    data = json.loads(config.model_dump_json()) if hasattr(config, "model_dump_json") else dict(config)
    for k in ("progress",):
        data.pop(k, None)
    files = [*config.safety, *config.over_refusal, *(p for p, _ in config.task)]
    data["files"] = [fingerprint(Path(f)) for f in files]
    return data


def sweep(pre: str | Path, post: str | Path | list[str | Path], out: str | Path, *,
          methods: list[str], weights: list[float], eval_config: Any,
          params: dict[str, dict[str, Any]] | None = None, select_on: str | Path | None = None,
          select_scorer: str | None = None, asr_tolerance: float = 0.02,
          refusal_tolerance: float = 0.02, save_best: bool = False, overwrite: bool = False,
          progress: bool = True, seed: int = 0, anchor: str | Path | None = None,
          allow_pickle: bool = False, title: str | None = None) -> SweepResult:
    """Evaluate pre, post and every (method, λ) merge; write results and the recommendation.

    (The report is written by the caller: :func:`mergesafe.api.sweep`, the ``sweep`` command.)
    Each finished trial is appended to `OUT/results.jsonl` at once; running again skips the
    trials whose key (inputs, method, parameters, λ, seed, evaluation settings) is already there.
    `overwrite=True` starts from an empty results file (the old one is removed).
    """
    from mergesafe.checkpoint.chat_template import chat_template_source, check_chat_template
    from mergesafe.checkpoint.hf_model import load_for_generation, load_tokenizer
    from mergesafe.checkpoint.inputs import check_not_input
    from mergesafe.evaluate.api import evaluate_loaded, load_eval_sets, load_judge
    from mergesafe.merge.registry import validate_params
    from mergesafe.sweep.live import LiveMerge

    pre = Path(pre)
    posts = [Path(p) for p in (post if isinstance(post, list) else [post])]
    out = Path(out)
    for path in [pre, *posts, *([Path(anchor)] if anchor else [])]:
        if not path.exists():
            raise UserError("no such model folder", path=path)
    check_not_input(out, [pre, *posts, anchor], may_contain=True)  # OUT is never replaced
    if not weights:
        raise UserError("empty weight grid", path="--weights")
    if not methods:
        raise UserError("no merge method given", path="--methods")
    check_grid(methods, weights)
    params = params or {}
    checked = {m: validate_params(m, dict(params.get(m, {}))) for m in methods}

    select_set = None
    if select_on is not None:
        select_on = Path(select_on)
        scorer = select_scorer or (eval_config.task[0][1] if eval_config.task else None)
        if scorer is None:
            raise UserError("--select-on needs a scorer: give --task FILE --scorer NAME or --select-scorer",
                            path=select_on)
        select_set = select_on.stem
        if any(Path(p).stem == select_set for p, _ in eval_config.task):
            raise UserError("the selection set has the same name as a task set", path=select_on)
        eval_config = eval_config.model_copy(update={"task": [*eval_config.task, (select_on, scorer)]})

    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", path=out)
    # everything that can be wrong with the input is found before OUT is created
    sets = load_eval_sets(eval_config)
    settings = _eval_settings(eval_config)
    inputs = {"pre": fingerprint(pre), "posts": [fingerprint(p) for p in posts],
              "anchor": fingerprint(Path(anchor)) if anchor else None}
    live_inputs = LiveMerge.open_inputs(pre, posts, anchor=Path(anchor) if anchor else None,
                                        allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(_tokenizer_source(pre, posts))
    check_chat_template(tokenizer, chat_template_source(tokenizer))

    if overwrite and (out / "results.jsonl").exists():
        (out / "results.jsonl").unlink()
    with _kept_only_if_used(out):
        store = ResultsStore(out)
        notes = []
        if store.set_aside is not None:
            notes.append(f"{out / 'results.jsonl'} was written by an incompatible version; kept as "
                         f"{store.set_aside.name}, a new results file was started")

        trials: list[tuple[str, float, dict[str, Any]]] = [("pre", 0.0, {}), ("post", 1.0, {})]
        trials += [(m, float(w), checked[m]) for m in methods for w in weights]
        keyed = [(m, w, p, trial_key(inputs=inputs, method=m, weight=w, params=p, seed=seed, eval=settings))
                 for m, w, p in trials]
        todo = [t for t in keyed if store.get(t[3]) is None]

        computed = 0
        if todo:
            model, _ = load_for_generation(pre, device=eval_config.device, allow_pickle=allow_pickle)
            judge = load_judge(eval_config.judge, batch_size=eval_config.judge_batch_size,
                               device=eval_config.device)
            live = LiveMerge(model, live_inputs)
            with _trial_progress(len(keyed), len(keyed) - len(todo), progress) as bar:
                for method, weight, p, key in todo:
                    t0 = time.perf_counter()
                    live.apply(method, weight, p, seed)
                    t1 = time.perf_counter()
                    metrics = evaluate_loaded(model, tokenizer, sets, eval_config, judge=judge)
                    t2 = time.perf_counter()
                    row = {"method": method, "weight": weight, "params": p,
                           "safety": metrics["safety"], "over_refusal": metrics["over_refusal"],
                           "task": metrics["task"], "key": key, "seed": seed,
                           "seconds": {"merge": round(t1 - t0, 4), "eval": round(t2 - t1, 4)}}
                    store.append(row)
                    computed += 1
                    bar.advance(row, _best_so_far([store.get(k) for *_, k in keyed], asr_tolerance,
                                                  refusal_tolerance, select_set))

        rows = [store.get(k) for *_, k in keyed]
        rec = recommend(rows, asr_tolerance=asr_tolerance, refusal_tolerance=refusal_tolerance,
                        select_set=select_set)
        front = pareto_front(rows, select_set)
        _write_json(out / "recommendation.json", {k: rec[k] for k in ("method", "weight", "params", "reason")}
                    | {"key": rec["key"], "qualified": rec["qualified"], "select_on": select_set,
                       "asr_tolerance": asr_tolerance, "refusal_tolerance": refusal_tolerance})
        result = SweepResult(rows=rows, recommendation=rec, front=front, out=out, select_set=select_set,
                             computed=computed, reused=len(keyed) - computed, notes=notes,
                             title=title or "mergesafe sweep",
                             inputs={"pre": str(pre), "post": ", ".join(map(str, posts)),
                                     "judge": str(eval_config.judge)})
        if save_best:
            result.best_model = _save_best(pre, posts, out / "best", rec, seed, allow_pickle, anchor)
        return result


@contextmanager
def _kept_only_if_used(out: Path) -> Iterator[None]:
    """Create OUT; a sweep that fails before its first trial leaves no empty OUT behind."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _best_so_far(rows: list[Row | None], asr_tolerance: float, refusal_tolerance: float,
                 select_set: str | None) -> str:
    done = [r for r in rows if r is not None]
    if not any(r["method"] == "pre" for r in done) or len(done) < 2:
        return ""
    rec = recommend(done, asr_tolerance=asr_tolerance, refusal_tolerance=refusal_tolerance,
                    select_set=select_set)
    pick = next(r for r in done if r.get("key") == rec["key"])
    text = f"{rec['method']} λ={rec['weight']:g} (ASR {100 * (mean_asr(pick) or 0):.0f}%"
    score = task_score(pick, select_set)
    return text + (f", task {100 * score:.0f}%)" if score is not None else ")")


def _tokenizer_source(pre: Path, posts: list[Path]) -> Path:
    """The tokenizer (and chat template) of post when it has one, else pre's — as `merge` does."""
    for candidate in (posts[0], pre):
        if any((candidate / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return candidate
    return pre


def _save_best(pre: Path, posts: list[Path], target: Path, rec: dict[str, Any], seed: int,
               allow_pickle: bool, anchor: str | Path | None) -> Path:
    from mergesafe.merge.api import merge

    method, weight = rec["method"], rec["weight"]
    if method in ("pre", "post"):
        method = "linear"
    n = len(posts)
    return merge(pre, posts if n > 1 else posts[0], target, method=method,
                 weight=[weight / n] * n if n > 1 else weight, params=rec.get("params") or {},
                 seed=seed, anchor=anchor, overwrite=True, allow_pickle=allow_pickle)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class _trial_progress:
    """A rich progress bar over trials that shows the best merge seen so far."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.best: tuple[float, str] | None = None

    def __enter__(self) -> "_trial_progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.progress.start()
            self.task = self.progress.add_task("", total=self.total, completed=self.done)
        return self

    def advance(self, row: Row, best: str) -> None:
        if not self.enabled:
            return
        desc = f"last: {row['method']} λ={row['weight']:g}" + (f" · best so far: {best}" if best else "")
        self.progress.update(self.task, advance=1, description=desc)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()
