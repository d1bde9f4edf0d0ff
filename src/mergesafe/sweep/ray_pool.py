"""The sweep's trials on a Ray cluster: one actor per worker, the driver alone writes results.

Each worker is a Ray actor wrapping :class:`~mergesafe.sweep.worker.TrialWorker`: it loads pre,
the posts and the judge once, from paths every node can read (no tensor goes through the object
store), and runs the trials handed to it one at a time.  The driver keeps the queue, hands the
next trial to whichever worker is free, and appends each finished row to `results.jsonl` itself
(the caller's `on_row`), so a finished trial is written exactly once.  A worker that dies
(a crash, `ray.kill`, a lost node) is replaced by a fresh actor and its trial goes back to the
front of the queue; a trial that kills its worker `MAX_ATTEMPTS` times stops the sweep.

Cluster: ``address="auto"`` (or ``RAY_ADDRESS`` set) joins a running cluster; otherwise a local
one is started for the sweep and shut down after it.  Workers: by default one per GPU, or on a
CPU-only cluster one per two cores, each with its share of the cores as torch threads.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergesafe.errors import UserError
from mergesafe.sweep.progress import TrialProgress
from mergesafe.sweep.worker import Trial, TrialWorker, WorkerSpec, make_worker

INSTALL_LINE = "pip install 'mergesafe[ray]'"
MAX_ATTEMPTS = 3  # times one trial may lose its worker before the sweep gives up
WORKER_PREFIX = "mergesafe-sweep-worker"


class RayWorker:
    """The actor: a :class:`TrialWorker` whose construction error is kept and raised by each call,
    so that the driver sees the original error (a `UserError` stays one) instead of a dead actor."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.error: BaseException | None = None
        try:
            self.worker: TrialWorker | Any = make_worker(spec)  # a vLLM worker on --backend vllm
        except Exception as err:  # noqa: BLE001 - raised again by ready() and run()
            self.worker, self.error = None, err

    def ready(self) -> list[str]:
        """The worker's start-up notes (a vLLM worker's adapter fallback), or its start-up error."""
        if self.error is not None:
            raise self.error
        return list(getattr(self.worker, "notes", []))

    def run(self, trial: Trial) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if self.worker is None:
            raise self.error or RuntimeError("worker failed to start")
        return self.worker.run(trial)


def require_ray() -> Any:
    """The `ray` module, or a `UserError` with the install line."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {INSTALL_LINE}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """`--ray-address`, `--workers`, `--gpus-per-worker` (None: chosen from the cluster), and the
    torch threads of each worker (API only; None: its share of the cluster's cores)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    threads_per_worker: int | None = None  # torch threads of each worker (default: its share of cores)


@dataclass(frozen=True)
class WorkerShape:
    count: int
    cpus: float
    gpus: float
    threads: int


def worker_shape(resources: dict[str, float], options: RayOptions) -> WorkerShape:
    """How many workers and what each one asks of the cluster (pure: tested without Ray)."""
    cpus = float(resources.get("CPU", 1.0)) or 1.0
    gpus = float(resources.get("GPU", 0.0))
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per_gpu and per_gpu > gpus:
        raise UserError(f"--gpus-per-worker {per_gpu:g}: the cluster has {gpus:g} GPUs")
    if options.workers is not None:
        count = options.workers
    elif per_gpu:
        count = max(1, int(gpus // per_gpu))
    else:
        count = max(1, int(cpus // 2))
    if per_gpu and count * per_gpu > gpus:
        raise UserError(f"--workers {count} × --gpus-per-worker {per_gpu:g} needs {count * per_gpu:g} "
                        f"GPUs; the cluster has {gpus:g}")
    share = cpus / count
    worker_cpus = float(int(share)) if share >= 1 else share  # fractional shares when oversubscribed
    if per_gpu:
        worker_cpus = min(worker_cpus, 1.0)
    threads = options.threads_per_worker or max(1, int(share))
    return WorkerShape(count=count, cpus=worker_cpus, gpus=per_gpu, threads=threads)


def connect(address: str | None) -> bool:
    """Join or start a cluster; True when this call started (and so must stop) it."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    settings = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, **settings)
            return True
        ray.init(**settings)
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster at {address!r}: {err}", path="--ray-address") from None
    return True


class RayPool:
    """The actors of one sweep; `run` hands them trials until none is left."""

    def __init__(self, spec: WorkerSpec, options: RayOptions) -> None:
        ray = require_ray()
        self.ray = ray
        t0 = time.perf_counter()
        self.started = connect(options.address)
        self.connect_seconds = time.perf_counter() - t0
        self.ready_seconds = 0.0  # workers built (models loaded), after connecting
        self.actors: list[Any] = []
        self.notes: list[str] = []
        try:
            self.shape = worker_shape(ray.cluster_resources(), options)
            self.spec = WorkerSpec(**{**spec.__dict__, "threads": self.shape.threads})
            self.remote_class = ray.remote(RayWorker)
            self.actors = [self._start(i) for i in range(self.shape.count)]
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> Any:
        name = f"{WORKER_PREFIX}-{os.getpid()}-{index}"
        return self.remote_class.options(name=name, num_cpus=self.shape.cpus, num_gpus=self.shape.gpus,
                                         max_restarts=0, max_concurrency=1).remote(self.spec)

    def _replace(self, index: int) -> None:
        try:
            self.ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[index] = self._start(index)

    def run(self, todo: list[Trial], on_row: Callable[[dict[str, Any], list[dict[str, Any]]], None],
            bar: TrialProgress) -> None:
        """Run every trial of `todo` once; `on_row(row, generations)` is called in this process as
        each one ends."""
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        queue: deque[tuple[Trial, int]] = deque((t, 0) for t in todo)
        idle = list(range(len(self.actors)))
        running: dict[Any, tuple[int, Trial, int]] = {}
        for i in idle:
            bar.worker(i, "loading")
        self._wait_ready(bar)
        while queue or running:
            while idle and queue:
                index = idle.pop(0)
                trial, attempts = queue.popleft()
                running[self.actors[index].run.remote(trial)] = (index, trial, attempts)
                bar.worker(index, trial.label)
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                index, trial, attempts = running.pop(ref)
                try:
                    row, generations = ray.get(ref)
                except RayTaskError as err:  # the trial itself failed: the same error as in one process
                    _raise_cause(err)
                except RayActorError as err:
                    attempts += 1
                    if attempts >= MAX_ATTEMPTS:
                        raise UserError(f"trial {trial.label} lost its worker {attempts} times; last: "
                                        f"{' '.join(str(err).split())[:300]}") from None
                    self.notes.append(f"worker {index} died during {trial.label}; restarted, trial retried")
                    self._replace(index)
                    queue.appendleft((trial, attempts))
                    bar.worker(index, "restarting")
                else:
                    on_row(row, generations)
                    bar.worker(index, "idle")
                idle.append(index)

    def _wait_ready(self, bar: TrialProgress) -> None:
        """Wait for every worker to load its model; a start-up error is raised as it is.  The
        workers' start-up notes are kept once each (every worker says the same)."""
        from ray.exceptions import RayTaskError

        t0 = time.perf_counter()
        try:
            for notes in self.ray.get([a.ready.remote() for a in self.actors]):
                self.notes.extend(n for n in notes if n not in self.notes)
            self.ready_seconds = time.perf_counter() - t0
        except RayTaskError as err:
            _raise_cause(err)
        for i in range(len(self.actors)):
            bar.worker(i, "idle")

    def close(self) -> None:
        """Stop the workers (finished rows are already on disk); stop the cluster if we started it."""
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.started:
            ray.shutdown()


def _raise_cause(err: BaseException) -> None:
    """Raise the worker's own exception (a `UserError` stays one) instead of Ray's wrapper."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        raise cause from None
    raise err
