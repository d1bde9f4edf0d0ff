"""lm-evaluation-harness tasks (`--lm-eval TASKS`) on the model in memory.

The loaded model (a `PreTrainedModel` or a `PeftModel`, e.g. a sweep's live merged model) is
wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=tok)` and passed to
`lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=DIR))`
(EleutherAI, lm-evaluation-harness 0.4.x).  Nothing is re-implemented: every number is lm-eval's
own, with its default seeds, its bootstrap, and each task's own prompts, few-shot examples and
decoding settings (the YAML's `generation_kwargs`; mergesafe's `--max-new-tokens`,
`--repetition-penalty` and `--system-prompt` do not apply).  No chat template is applied
(lm-eval's default).  `--limit N` is lm-eval's `limit` (the first N documents of each task).
No response cache is used (`use_cache=None`): a cache would carry answers across merge weights.

Names in `metrics.json` (under `task`): ``lm-eval:TASK:METRIC`` where lm-eval's result key
``METRIC,FILTER`` becomes ``METRIC`` when FILTER is ``none`` and ``METRIC/FILTER`` otherwise
(`exact_match,none` → `exact_match`; BBH's `exact_match,get-answer` → `exact_match/get-answer`);
a `:` in either part becomes `_`.  Each entry: `score`, `n` (documents evaluated), `scorer`
("lm-eval"), `stderr` when lm-eval gives one, `higher_is_better` when the task says.  A
requested group with aggregate metrics (e.g. `bbh_cot_fewshot`) is reported as the group; a
tag or a group without aggregates is reported task by task.

Everything runs offline: `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` are set (and the already
imported `huggingface_hub`/`datasets` flags switched) and `nltk.download` is a no-op for the
whole run.  A task whose data is not on this machine fails while it is loaded (before any model
work) with one line saying how to make it local; IFEval without nltk's `punkt_tab` likewise.
`--backend vllm` and `--sample` are refused with `--lm-eval` (`check_harness_config`).
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesafe.errors import UserError

if TYPE_CHECKING:
    from mergesafe.evaluate.config import EvalConfig

SCORER = "lm-eval"
PREFIX = "lm-eval:"
INSTALL = "pip install 'mergesafe[lm-eval]'"
OFFLINE_HINT = ("make its data local: a task YAML in --lm-eval-include DIR with dataset_path: json "
                "and dataset_kwargs.data_files (README, lm-evaluation-harness tasks)")
_WRAPPER_ATTR = "_mergesafe_hflm"  # the HFLM wrapper kept on the model object it wraps


# --------------------------------------------------------------------------- names

def parse_task_list(text: str | Sequence[str] | None) -> list[str]:
    """`"bbh_cot_fewshot, ifeval"` (or a list of such strings) → `["bbh_cot_fewshot", "ifeval"]`."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    names = [n.strip() for p in parts for n in p.split(",")]
    if any(not n for n in names):
        raise UserError(f"empty task name in {','.join(parts)!r}", path="--lm-eval")
    return list(dict.fromkeys(names))


def metric_name(result_key: str) -> str | None:
    """lm-eval's `METRIC,FILTER` result key → METRIC (filter `none`) or `METRIC/FILTER`.

    Stderr keys (`METRIC_stderr,FILTER`) and keys without a filter (`alias`) give None.
    """
    metric, sep, filt = result_key.partition(",")
    if not sep or metric.endswith("_stderr"):
        return None
    metric, filt = metric.replace(":", "_"), filt.replace(":", "_")
    return metric if filt == "none" else f"{metric}/{filt}"


def result_key(task: str, metric: str) -> str:
    """The name of one lm-eval number in `metrics.json`'s `task`: `lm-eval:TASK:METRIC`."""
    return f"{PREFIX}{task}:{metric}"


def parse_result_key(key: str) -> tuple[str, str] | None:
    """`lm-eval:TASK:METRIC` → (TASK, METRIC); None for anything else (e.g. a file name)."""
    if not key.startswith(PREFIX):
        return None
    task, sep, metric = key[len(PREFIX):].rpartition(":")
    if not sep or not task or not metric:
        raise UserError(f"{key!r} is not of the form lm-eval:TASK:METRIC", path="--select-on")
    return task, metric


# --------------------------------------------------------------------------- environment

def require_lm_eval() -> None:
    """lm-eval is an optional dependency: say how to install it."""
    try:
        import lm_eval  # noqa: F401 - slow (seconds): imported only when --lm-eval is given
    except ImportError as err:
        raise UserError(f"--lm-eval needs lm-evaluation-harness, which is not installed ({err}): {INSTALL}",
                        path="--lm-eval") from None


def check_harness_config(config: EvalConfig) -> None:
    """Settings that cannot go with `--lm-eval` (found before any model is loaded)."""
    if config.backend != "transformers":
        raise UserError("--lm-eval runs on the model in memory with the transformers backend, "
                        "not --backend vllm", path="--lm-eval")
    if config.sample is not None:
        raise UserError("--sample does not apply to --lm-eval tasks (lm-eval evaluates the first N "
                        "documents of each task: use --limit)", path="--lm-eval")
    require_lm_eval()


@contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the block: environment and the flags already read at import.

    `nltk.download` is switched off too: IFEval's checks call it when `punkt_tab` is missing
    (it must come from NLTK_DATA instead; see `_check_nltk`).
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved_env})
    flags = [(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_HUB_OFFLINE"),
             (sys.modules.get("datasets.config"), "HF_DATASETS_OFFLINE")]
    saved_flags = [(mod, name, getattr(mod, name)) for mod, name in flags
                   if mod is not None and hasattr(mod, name)]
    for mod, name, _ in saved_flags:
        setattr(mod, name, True)
    try:
        import nltk
    except ImportError:
        nltk = None
    if nltk is not None:
        saved_flags.append((nltk, "download", nltk.download))
        nltk.download = _no_download
    try:
        yield
    finally:
        for mod, name, value in saved_flags:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _no_download(*args: Any, **kwargs: Any) -> bool:
    """`nltk.download` while offline: nothing is fetched."""
    return False


def _check_nltk(name: str) -> None:
    """IFEval's instruction checks tokenize with nltk's `punkt_tab`, which must be local."""
    if "ifeval" not in name:
        return
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        raise UserError(f"lm-eval task {name!r} needs nltk's punkt_tab data, which is not found: on a machine "
                        "with internet run `python -m nltk.downloader -d DIR punkt_tab`, copy DIR here and "
                        "set NLTK_DATA=DIR", path="--lm-eval") from None


def task_manager(include: str | None) -> Any:
    """lm-eval's `TaskManager` (registry + `include`), built once per process and include folder
    (indexing the registry's YAML files takes seconds), again when the folder's YAMLs change."""
    listing: tuple = ()
    if include:
        listing = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                        for p in sorted(Path(include).rglob("*.yaml")) if p.is_file())
    return _task_manager(include, listing)


@lru_cache(maxsize=4)
def _task_manager(include: str | None, listing: tuple) -> Any:
    with offline():
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=include) if include else TaskManager()


# --------------------------------------------------------------------------- tasks

@dataclass
class HarnessTasks:
    """Validated lm-eval tasks: names known, data loadable offline.

    `reported[name]` lists the result names reported for a requested name (the name itself, or
    its leaf tasks for a tag or a group without aggregate metrics); `metrics[name]` the METRIC
    names each is expected to give (empty when lm-eval decides them only at run time).
    """

    tasks: list[str]
    include: Path | None = None
    reported: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, set[str]] = field(default_factory=dict)
    lower_is_better: set[str] = field(default_factory=set)  # `TASK:METRIC` where lower is better

    def check_key(self, key: str) -> None:
        """A `--select-on lm-eval:TASK:METRIC` must name a reported task and one of its metrics."""
        parsed = parse_result_key(key)
        if parsed is None:
            return
        task, metric = parsed
        names = [n for ns in self.reported.values() for n in ns]
        if task not in names:
            raise UserError(f"task {task!r} is not among the --lm-eval tasks' results "
                            f"({', '.join(names)})", path="--select-on")
        known = self.metrics.get(task) or set()
        if known and metric not in known:
            raise UserError(f"task {task!r} has no metric {metric!r}; it has: {', '.join(sorted(known))}",
                            path="--select-on")
        if f"{task}:{metric}" in self.lower_is_better:
            raise UserError(f"lower is better for {metric!r} of task {task!r}; the selection takes the "
                            "highest task score", path="--select-on")

    def run(self, model: Any, tokenizer: Any, *, batch_size: int, limit: int | None = None) -> dict[str, dict]:
        """Run the tasks on `model` (in memory) and return the `task` entries of metrics.json."""
        import lm_eval

        with offline():
            lm = hflm(model, tokenizer, batch_size)
            try:
                results = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks),
                                                  task_manager=task_manager(_include_str(self.include)),
                                                  limit=limit, log_samples=False)
            except AssertionError as err:  # lm-eval's checks of a task against the model
                raise UserError(f"lm-eval refused to run: {err}", path="--lm-eval") from None
            except LookupError as err:  # nltk: "Resource punkt_tab not found" (a task using IFEval's checks)
                if type(err) is not LookupError or "nltk" not in str(err):
                    raise
                raise UserError("an lm-eval task needs nltk data that is not found (e.g. punkt_tab): on a "
                                "machine with internet run `python -m nltk.downloader -d DIR punkt_tab`, "
                                "copy DIR here and set NLTK_DATA=DIR", path="--lm-eval") from None
        return self.entries(results)

    def entries(self, results: dict) -> dict[str, dict]:
        """lm-eval's `simple_evaluate` output → `{lm-eval:TASK:METRIC: entry}`."""
        out: dict[str, dict] = {}
        res = {**results.get("groups", {}), **results.get("results", {})}
        n_samples = results.get("n-samples", {})
        group_tasks = _leaves(results.get("group_subtasks", {}))
        better = results.get("higher_is_better", {})
        for names in self.reported.values():
            for name in names:
                values = res.get(name, {})
                leaves = group_tasks.get(name, [name])
                n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves)
                for k, v in values.items():
                    metric = metric_name(k)
                    if metric is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                        continue
                    entry: dict[str, Any] = {"score": float(v), "n": n, "scorer": SCORER}
                    base, filt = k.split(",", 1)
                    stderr = values.get(f"{base}_stderr,{filt}")
                    if isinstance(stderr, (int, float)) and not isinstance(stderr, bool):
                        entry["stderr"] = float(stderr)
                    hib = better.get(name, {}).get(base)
                    if isinstance(hib, bool):
                        entry["higher_is_better"] = hib
                    out[result_key(name, metric)] = entry
        return out


def _include_str(include: Path | None) -> str | None:
    return str(Path(include).resolve()) if include is not None else None


def _leaves(group_subtasks: dict[str, list[str]]) -> dict[str, list[str]]:
    """Group → its leaf tasks (through nested groups)."""
    def walk(name: str, seen: frozenset[str]) -> list[str]:
        if name not in group_subtasks or name in seen:
            return [name]
        return [leaf for child in group_subtasks[name] for leaf in walk(child, seen | {name})]

    return {g: walk(g, frozenset()) for g in group_subtasks}


def load_harness_tasks(tasks: Sequence[str], include: Path | None = None) -> HarnessTasks:
    """Check lm-eval is installed, every name is known, and every task's data loads offline."""
    require_lm_eval()
    if include is not None and not Path(include).is_dir():
        raise UserError("not a folder of lm-eval task YAMLs", path=include)
    manager = task_manager(_include_str(include))
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            where = " or in --lm-eval-include" if include else " (local tasks: --lm-eval-include DIR)"
            raise UserError(f"unknown lm-eval task {name!r}: not in lm-eval's registry{where}{hint}",
                            path="--lm-eval")
    harness = HarnessTasks(list(tasks), Path(include) if include is not None else None)
    for name in tasks:
        _check_nltk(name)
        try:
            with offline():
                loaded = manager.load([name])
        except Exception as err:  # noqa: BLE001 - any failure to build the task is the user's data
            first = str(err).strip().splitlines()[0][:100] if str(err).strip() else ""
            raise UserError(f"lm-eval task {name!r} could not be loaded offline "
                            f"({type(err).__name__}: {first}); {OFFLINE_HINT}", path="--lm-eval") from None
        group = loaded["groups"].get(name)
        if name in loaded["tasks"] and name not in loaded["groups"]:
            harness.reported[name] = [name]
            harness.metrics[name] = _task_metrics(loaded["tasks"][name], name, harness.lower_is_better)
        elif group is not None and getattr(group, "aggregate_metric_list", None):
            harness.reported[name] = [name]
            harness.metrics[name] = _group_metrics(group)
        else:  # a tag, or a group without aggregates: its tasks one by one
            harness.reported[name] = sorted(loaded["tasks"])
            for t in loaded["tasks"]:
                harness.metrics[t] = _task_metrics(loaded["tasks"][t], t, harness.lower_is_better)
    return harness


def _task_metrics(task: Any, name: str, lower_is_better: set[str]) -> set[str]:
    """METRIC names a task will report: its metrics × its filters (`none` when it has none).
    Those where lower is better are added to `lower_is_better` as `TASK:METRIC`."""
    try:
        better = dict(task.higher_is_better())
        filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
    except Exception:  # noqa: BLE001 - unknown until run time
        return set()
    names = set()
    for m, higher in better.items():
        for f in filters:
            if (n := metric_name(f"{m},{f}")) is not None:
                names.add(n)
                if higher is False:
                    lower_is_better.add(f"{name}:{n}")
    return names


def _group_metrics(group: Any) -> set[str]:
    names: set[str] = set()
    for agg in group.aggregate_metric_list or []:
        filters = agg.filter_list
        if not filters:
            return set()  # filters found from the children's results at run time
        for f in [filters] if isinstance(filters, str) else filters:
            if (n := metric_name(f"{agg.metric},{f}")) is not None:
                names.add(n)
    return names


# --------------------------------------------------------------------------- the model

def hflm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's `HFLM` around the in-memory model, made once per (model, tokenizer, batch size).

    The wrapper is kept on the model object itself, so it lives exactly as long as the model:
    a sweep writes each merge into the same model in place and reuses one wrapper; a model that
    is dropped takes its wrapper with it.
    """
    from lm_eval.models.huggingface import HFLM

    cached = model.__dict__.get(_WRAPPER_ATTR)
    if cached is not None and cached[0] is tokenizer and cached[1] == batch_size:
        return cached[2]
    # a copy: HFLM sets a pad token on a tokenizer without one, which mergesafe's own generation
    # (the same tokenizer, next trial) must not see
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    model.__dict__[_WRAPPER_ATTR] = (tokenizer, batch_size, lm)
    return lm
