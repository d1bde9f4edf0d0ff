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

from mergesafe.checkpoint.atomic import signals_raise
from mergesafe.errors import UserError
from mergesafe.evaluate.harness import parse_result_key
from mergesafe.sweep.grid import check_grid
from mergesafe.sweep.lock import SweepLock
from mergesafe.sweep.progress import TrialProgress
from mergesafe.sweep.ray_pool import RayOptions, RayPool, require_ray
from mergesafe.sweep.results import (ResultsStore, fingerprint, remove_generations, trial_key,
                                     write_generations)
from mergesafe.sweep.seeds import mean_over_posts
from mergesafe.sweep.selection import mean_asr, pareto_front, recommend, task_score
from mergesafe.sweep.worker import Trial, WorkerSpec, make_worker

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
    timings: dict[str, float] = field(default_factory=dict)  # seconds: ray_connect, workers_ready, trials
    seed_rows: list[Row] = field(default_factory=list)  # --each-post: the per-post rows behind `rows`

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
    if getattr(config, "lm_eval_include", None):  # lm-eval task YAMLs (and data kept beside them)
        files.append(config.lm_eval_include)
    data["files"] = [fingerprint(Path(f)) for f in files]
    return data


def sweep(pre: str | Path, post: str | Path | list[str | Path], out: str | Path, *,
          methods: list[str], weights: list[float], eval_config: Any,
          params: dict[str, dict[str, Any]] | None = None, select_on: str | Path | None = None,
          select_scorer: str | None = None, asr_tolerance: float = 0.02,
          refusal_tolerance: float = 0.02, save_best: bool = False, overwrite: bool = False,
          progress: bool = True, seed: int = 0, anchor: str | Path | None = None,
          allow_pickle: bool = False, title: str | None = None,
          ray: RayOptions | None = None, each_post: bool = False) -> SweepResult:
    """Evaluate pre, post and every (method, λ) merge; write results and the recommendation.

    (The report is written by the caller: :func:`mergesafe.api.sweep`, the ``sweep`` command.)
    Each finished trial is appended to `OUT/results.jsonl` at once; running again skips the
    trials whose key (inputs, method, parameters, λ, seed, evaluation settings) is already there.
    `overwrite=True` starts from an empty results file (the old one is removed).
    `each_post=True` (several posts: fine-tuning seeds) merges and evaluates each post on its own
    and ranks the mean over posts (:mod:`mergesafe.sweep.seeds`); otherwise the posts' weights are
    averaged into one merge.
    `ray=RayOptions(...)` runs the trials on a Ray cluster (:mod:`mergesafe.sweep.ray_pool`); this
    process alone writes the results either way.  One sweep at a time holds OUT
    (:class:`~mergesafe.sweep.lock.SweepLock`); Ctrl-C or SIGTERM raises :class:`SweepInterrupted`
    with every finished trial kept.
    """
    from mergesafe.checkpoint.chat_template import chat_template_source, check_chat_template
    from mergesafe.checkpoint.hf_model import load_tokenizer
    from mergesafe.checkpoint.inputs import check_not_input
    from mergesafe.evaluate.api import load_eval_sets
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
    each_post = each_post and len(posts) > 1
    if each_post and save_best:
        raise UserError("--save-best writes one model, but --each-post evaluates several posts: pick the "
                        "post to ship and run `mergesafe merge` with the recommended method and λ",
                        path="--save-best")

    select_set = None
    lm_eval_select = parse_result_key(str(select_on)) if select_on is not None else None
    if lm_eval_select is not None:  # an lm-eval result: `lm-eval:TASK:METRIC` of a --lm-eval task
        if not eval_config.lm_eval:
            raise UserError(f"--select-on {select_on} needs --lm-eval with task {lm_eval_select[0]!r}",
                            path="--select-on")
        if select_scorer is not None:
            raise UserError("--select-scorer is for a --select-on FILE, not an lm-eval result",
                            path="--select-scorer")
        select_set = str(select_on)  # its metric is checked once the tasks are loaded
    elif select_on is not None:
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
    if lm_eval_select is not None and sets.harness is not None:
        sets.harness.check_key(select_set)
    settings = _eval_settings(eval_config)
    inputs = {"pre": fingerprint(pre), "posts": [fingerprint(p) for p in posts],
              "anchor": fingerprint(Path(anchor)) if anchor else None}
    live_inputs = LiveMerge.open_inputs(pre, posts, anchor=Path(anchor) if anchor else None,
                                        allow_pickle=allow_pickle)
    serve_lora = False  # λ-scaled adapters on vLLM: only when a method can use them
    if eval_config.backend == "vllm":  # vLLM, an architecture it runs, posts of pre's shapes
        from mergesafe.sweep.vllm_worker import LORA_METHODS, check_inputs

        check_inputs(live_inputs)
        serve_lora = any(m in LORA_METHODS for m in methods)
    tokenizer_source = _tokenizer_source(pre, posts)
    tokenizer = load_tokenizer(tokenizer_source)
    check_chat_template(tokenizer, chat_template_source(tokenizer))

    spec = WorkerSpec(pre=pre, posts=posts, tokenizer_source=tokenizer_source,
                      eval_config=eval_config, seed=seed, anchor=Path(anchor) if anchor else None,
                      allow_pickle=allow_pickle, serve_lora=serve_lora)
    if ray is not None:
        require_ray()
    with _kept_only_if_used(out), SweepLock(out) as lock:
        if overwrite and (out / "results.jsonl").exists():
            (out / "results.jsonl").unlink()
        if overwrite:
            remove_generations(out)
        store = ResultsStore(out)
        notes = [lock.note] if lock.note else []
        if store.set_aside is not None:
            notes.append(f"{out / 'results.jsonl'} was written by an incompatible version; kept as "
                         f"{store.set_aside.name}, a new results file was started")

        merges = [("post", 1.0, {})] + [(m, float(w), checked[m]) for m in methods for w in weights]
        if each_post:  # one unit per (post, method, λ), keyed as a one-post sweep of that post
            units = [("pre", 0.0, {}, 0)] + [(m, w, p, i) for i in range(len(posts)) for m, w, p in merges]
            keyed = [(m, w, p, trial_key(inputs=inputs | {"posts": [inputs["posts"][i]]}, method=m, weight=w,
                                         params=p, seed=seed, eval=settings), None if m == "pre" else i)
                     for m, w, p, i in units]
        else:
            keyed = [(m, w, p, trial_key(inputs=inputs, method=m, weight=w, params=p, seed=seed, eval=settings),
                      None) for m, w, p in [("pre", 0.0, {}), *merges]]
        todo = [Trial(m, w, p, k, i) for m, w, p, k, i in keyed if store.get(k) is None]

        computed = 0
        timings: dict[str, float] = {}
        if todo:
            with TrialProgress(len(keyed), len(keyed) - len(todo), progress) as bar:
                def finished(row: Row, generations: list[Row]) -> None:
                    nonlocal computed
                    write_generations(out, row["key"], generations)  # before the row: a row has its file
                    store.append(row)
                    computed += 1
                    bar.advance(row, _best_so_far(_view([store.get(t[3]) for t in keyed], each_post),
                                                  asr_tolerance, refusal_tolerance, select_set))

                try:
                    with signals_raise():
                        _run_trials(todo, spec, finished, bar, ray, sets=sets, inputs=live_inputs,
                                    tokenizer=tokenizer, notes=notes, timings=timings)
                except KeyboardInterrupt as err:
                    raise SweepInterrupted(out, len(keyed) - len(todo) + computed, len(keyed),
                                           getattr(err, "signum", None)) from None

        rows = _view([store.get(t[3]) for t in keyed], each_post)
        rec = recommend(rows, asr_tolerance=asr_tolerance, refusal_tolerance=refusal_tolerance,
                        select_set=select_set)
        front = pareto_front(rows, select_set)
        _write_json(out / "recommendation.json", {k: rec[k] for k in ("method", "weight", "params", "reason")}
                    | {"key": rec["key"], "qualified": rec["qualified"], "select_on": select_set,
                       "asr_tolerance": asr_tolerance, "refusal_tolerance": refusal_tolerance})
        result = SweepResult(rows=rows, recommendation=rec, front=front, out=out, select_set=select_set,
                             computed=computed, reused=len(keyed) - computed, notes=notes,
                             title=title or "mergesafe sweep", timings=timings,
                             seed_rows=[store.get(t[3]) for t in keyed] if each_post else [],
                             inputs={"pre": str(pre), "post": ", ".join(map(str, posts)),
                                     "judge": str(eval_config.judge)})
        if save_best and rec["method"] == "pre":
            notes.append(f"the recommendation is pre itself: --save-best wrote no merge to {out / 'best'} "
                         f"(ship {pre} as it is)")
        elif save_best:
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
    if method == "post":
        method = "linear"
    n = len(posts)
    return merge(pre, posts if n > 1 else posts[0], target, method=method,
                 weight=[weight / n] * n if n > 1 else weight, params=rec.get("params") or {},
                 seed=seed, anchor=anchor, overwrite=True, allow_pickle=allow_pickle)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the trials: the finished ones are in OUT/results.jsonl."""

    def __init__(self, out: Path, finished: int, total: int, signum: int | None) -> None:
        super().__init__(f"interrupted after {finished} of {total} trials")
        self.out, self.finished, self.total, self.signum = out, finished, total, signum


def _view(rows: list[Row | None], each_post: bool) -> list[Row]:
    """The rows the front and the recommendation see: per-post rows averaged with --each-post."""
    done = [r for r in rows if r is not None]
    return mean_over_posts(done) if each_post else rows  # type: ignore[return-value]


def _run_trials(todo: list[Trial], spec: WorkerSpec, finished: Any, bar: TrialProgress,
                ray: RayOptions | None, *, sets: Any, inputs: Any, tokenizer: Any, notes: list[str],
                timings: dict[str, float]) -> None:
    """Run `todo` in this process (one worker) or on Ray; `finished(row)` is called here for each.

    `timings` gets the seconds spent joining the cluster, building the workers and running trials."""
    t0 = time.perf_counter()
    if ray is None:
        worker = make_worker(spec, sets=sets, inputs=inputs, tokenizer=tokenizer)
        try:
            notes.extend(getattr(worker, "notes", []))
            timings["workers_ready"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for row, generations in worker.run_many(todo, lambda trial: bar.worker(0, trial.label)):
                finished(row, generations)  # (vLLM and a LoRA post: several λ in one pass)
            timings["trials"] = time.perf_counter() - t1
        finally:
            worker.close()
        return
    pool = RayPool(spec, ray)
    try:
        pool.run(todo, finished, bar)
    finally:
        notes.extend(pool.notes)
        timings.update(ray_connect=pool.connect_seconds, workers_ready=pool.ready_seconds,
                       trials=time.perf_counter() - t0 - pool.connect_seconds - pool.ready_seconds)
        pool.close()
