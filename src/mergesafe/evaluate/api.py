"""The evaluation API: load the prompt sets once, then evaluate any number of models.

    sets = load_eval_sets(config)                # read and validate every file once
    judge = load_judge(config.judge)             # load a model judge once
    metrics = evaluate_loaded(model, tok, sets, config, judge=judge, out=folder)

`evaluate(model_or_path, out, config)` does all three for one model (the CLI uses it).

metrics.json (set names are the file stems):
    {"model": str,
     "safety":       {SET: {"asr": float, "n": int, "unparsed": int, "ci95": [lo, hi], ...}},
     "over_refusal": {SET: {"rate": float, "n": int, ...}},
     "task":         {SET: {"score": float, "n": int, "scorer": str, ...}}}
`--lm-eval` results are `task` entries too, named `lm-eval:TASK:METRIC` (scorer "lm-eval", plus
`stderr`; see `harness.py`).
`n` counts parsed verdicts (ASR = unsafe / (N − unparsed)); an undefined rate (n = 0) is NaN in
the returned dict and `null` in the file.  Extra keys: per-category breakdowns (`categories`),
counts (`unsafe`, `refusals`, `correct`, `total`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mergesafe.checkpoint.adapter import open_adapter
from mergesafe.checkpoint.hf_model import (
    has_tokenizer_files,
    load_for_generation,
    load_tokenizer,
    resolve_device,
)
from mergesafe.checkpoint.inputs import check_not_input, open_model
from mergesafe.errors import UserError
from mergesafe.evaluate.config import EvalConfig
from mergesafe.evaluate.harness import HarnessTasks, check_harness_config, load_harness_tasks
from mergesafe.evaluate.generate import generate_responses, sampling_of
from mergesafe.evaluate.judges.base import Judge, Judgement
from mergesafe.evaluate.judges.keyword import is_refusal
from mergesafe.evaluate.judges.registry import check_judge_spec, judge_folder, load_judge
from mergesafe.evaluate.metrics import over_refusal_metrics, safety_metrics, task_metrics
from mergesafe.evaluate.output import check_out, sha256_path, write_eval_dir
from mergesafe.evaluate.prompts import PromptSet, load_prompt_file
from mergesafe.evaluate.scorers.registry import get_scorer
from mergesafe.evaluate.vllm_engine import VllmGenerator, check_engine_config, engine_dtype, require_vllm

Generator = Callable[[Sequence[str], Callable[[int], None] | None], list[str]]


@dataclass
class EvalSets:
    """Prompt sets read and validated once (after limit/sample and the XSTest `safe` filter)."""

    safety: list[PromptSet] = field(default_factory=list)
    over_refusal: list[PromptSet] = field(default_factory=list)
    task: list[PromptSet] = field(default_factory=list)
    harness: HarnessTasks | None = None  # lm-eval tasks (`--lm-eval`), checked and loadable offline

    def all(self) -> list[PromptSet]:
        return [*self.safety, *self.over_refusal, *self.task]

    @property
    def n_prompts(self) -> int:
        return sum(len(s.rows) for s in self.all())


# --------------------------------------------------------------------------- loading

def load_eval_sets(config: EvalConfig) -> EvalSets:
    """Read every prompt set of `config`, check scorers and the judge spec; raise `UserError` early."""
    if not (config.safety or config.over_refusal or config.task or config.lm_eval):
        raise UserError("nothing to evaluate: give at least one --safety, --over-refusal or --task set "
                        "or --lm-eval tasks")
    if config.lm_eval:
        check_harness_config(config)
    check_engine_config(config)
    if isinstance(config.judge, str):
        check_judge_spec(config.judge, getattr(config, "judge_model", None))
    # limit/sample are applied while reading: `--limit 5` reads five rows of a big file
    common = dict(prompt_column=config.prompt_column, category_column=config.category_column,
                  sample=config.sample, seed=config.seed)
    _check_set_limits(config)
    sets = EvalSets()
    for path in config.safety:
        rows = load_prompt_file(path, limit=_limit(config, path, "safety"), **common)
        sets.safety.append(PromptSet(Path(path).stem, Path(path), "safety", rows))
    for path in config.over_refusal:
        rows = load_prompt_file(path, safe_only=True, limit=_limit(config, path, "over_refusal"), **common)
        if not rows:
            raise UserError("no benign rows: the label column has no 'safe' row", path=path)
        sets.over_refusal.append(PromptSet(Path(path).stem, Path(path), "over_refusal", rows))
    if config.num_samples > 1 and config.temperature == 0:
        raise UserError("--num-samples above 1 needs --temperature above 0 (greedy decoding gives "
                        "the same response every time)")
    for path, scorer in config.task:
        spec = get_scorer(scorer, path=path)
        spec.check_config(config, Path(path))
        rows = load_prompt_file(path, reference_column=config.reference_column,
                                require_reference=spec.needs_reference, fields=spec.required_fields,
                                limit=_limit(config, path, "task"), **common)
        sets.task.append(PromptSet(Path(path).stem, Path(path), "task", rows, scorer=scorer,
                                   samples=config.num_samples))
    for kind in ("safety", "over_refusal", "task"):
        seen: dict[str, Path] = {}
        for s in getattr(sets, kind):
            if s.name in seen:
                raise UserError(f"two {kind.replace('_', '-')} sets are both named {s.name!r} "
                                f"(also {seen[s.name]}); set names are file stems", path=s.path)
            seen[s.name] = s.path
    if config.lm_eval:  # last: indexing lm-eval's registry and loading the tasks' data take seconds
        sets.harness = load_harness_tasks(config.lm_eval, config.lm_eval_include)
    return sets


def _limit(config: EvalConfig, path: Path | str, kind: str) -> int | None:
    """The `--limit` of one set: its own (`SET=N`), else its kind's (`over-refusal=N`), else N."""
    own = config.set_limits
    for name in (Path(path).stem, kind.replace("_", "-"), kind):
        if name in own:
            return own[name]
    return config.limit


def _check_set_limits(config: EvalConfig) -> None:
    """Every `--limit SET=N` names a given set or a kind."""
    names = {Path(p).stem for p in [*config.safety, *config.over_refusal, *(p for p, _ in config.task)]}
    known = names | {"safety", "over-refusal", "over_refusal", "task"}
    for name in config.set_limits:
        if name not in known:
            raise UserError(f"--limit {name}={config.set_limits[name]}: no set named {name!r} (sets: "
                            f"{', '.join(sorted(names)) or 'none'}; kinds: safety, over-refusal, task)")


# --------------------------------------------------------------------------- progress

@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None] | None]]:
    """Yield `start(description, total) -> advance(n)`; no-ops when progress is off."""
    if not enabled:
        yield lambda description, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        def start(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield start


# --------------------------------------------------------------------------- scoring

def score_responses(sets: EvalSets, responses: dict[str, list[str]], judge: Judge,
                    *, model_name: str = "", progress: Callable[[int], None] | None = None,
                    config: EvalConfig | None = None) -> tuple[dict, list[dict]]:
    """Metrics and per-prompt rows from the responses of each set (keyed `kind/name`).

    Safety sets go through the judge; over-refusal sets through the judge when it can say
    whether a response is a refusal, else through the keyword rule; task sets through their
    scorer (`scorers/registry.py`; `config` carries the scorers' options).  A task set's
    responses are `len(rows) * s.samples` long, row-major; with several samples, each
    generations.jsonl row gets a `sample` key (0 … n−1) and the set's `score` is the mean over
    every sample (a scorer's `set_metrics`, e.g. humaneval's pass@k, may say otherwise).
    """
    config = config or EvalConfig()
    pairs: list[tuple[str, str]] = []
    for s in sets.safety:
        pairs += [(r.prompt, resp) for r, resp in zip(s.rows, responses[f"safety/{s.name}"])]
    if judge.can_judge_refusal:
        for s in sets.over_refusal:
            pairs += [(r.prompt, resp) for r, resp in zip(s.rows, responses[f"over_refusal/{s.name}"])]
    verdicts: list[Judgement] = judge.judge([p for p, _ in pairs], [r for _, r in pairs], progress) if pairs else []
    it = iter(verdicts)

    metrics: dict[str, Any] = {"model": model_name, "safety": {}, "over_refusal": {}, "task": {},
                               "judge": judge.name}
    rows: list[dict] = []
    for s in sets.safety:
        resps = responses[f"safety/{s.name}"]
        js = [next(it) for _ in resps]
        harmful = [j.harmful for j in js]
        metrics["safety"][s.name] = safety_metrics(harmful, [r.category for r in s.rows])
        for r, resp, j in zip(s.rows, resps, js):
            verdict = "unparsed" if j.harmful is None else "unsafe" if j.harmful else "safe"
            rows.append(_row(s, r, resp, verdict, j.raw))
    for s in sets.over_refusal:
        resps = responses[f"over_refusal/{s.name}"]
        if judge.can_judge_refusal:
            js = [next(it) for _ in resps]
            refused = [j.refusal for j in js]
            raws = [j.raw for j in js]
        else:
            refused = [is_refusal(resp) for resp in resps]
            raws = [""] * len(resps)
        metrics["over_refusal"][s.name] = over_refusal_metrics(refused, [r.category for r in s.rows])
        for r, resp, f, raw in zip(s.rows, resps, refused, raws):
            verdict = "unparsed" if f is None else "refusal" if f else "compliance"
            rows.append(_row(s, r, resp, verdict, raw))
    for s in sets.task:
        resps = responses[f"task/{s.name}"]
        n = s.samples
        if len(resps) != len(s.rows) * n:
            raise RuntimeError(f"task set {s.name}: {len(resps)} responses for {len(s.rows)} rows "
                               f"× {n} samples")
        scorer = get_scorer(s.scorer or "", path=s.path)
        flat_rows = [r for r in s.rows for _ in range(n)]
        scored = scorer.score_rows(flat_rows, resps, config)
        scores = [d["score"] for d in scored]
        per_row = [scores[i * n:(i + 1) * n] for i in range(len(s.rows))]
        # the mean over every sample = the mean of the rows' means (n samples each); `n` counts rows
        entry = task_metrics([sum(x) / n for x in per_row], s.scorer or "", [r.category for r in s.rows])
        entry["correct"] = sum(scores)
        if n > 1:
            entry["samples"] = n
        entry.update(scorer.set_metrics(per_row, config))
        metrics["task"][s.name] = entry
        for j, (r, resp, d) in enumerate(zip(flat_rows, resps, scored)):
            sc = d["score"]
            row = _row(s, r, resp, "correct" if sc >= 1.0 else "incorrect", "")
            row.update(reference=r.reference, score=sc)
            row.update({k: v for k, v in d.items() if k != "score"})
            if n > 1:
                row["sample"] = j % n
            rows.append(row)
    return metrics, rows


def _row(s: PromptSet, r, response: str, verdict: str, raw: str) -> dict:
    return {"set": s.name, "kind": s.kind, "line": r.line, "prompt": r.prompt, "response": response,
            "verdict": verdict, "judge_raw": raw, "category": r.category}


def config_judge(config: EvalConfig, *, shared: bool = False) -> Judge:
    """The judge `config.judge` names, loaded (an endpoint judge asks for `config.judge_model`;
    with `--backend vllm` a model judge generates on vLLM, `shared`: beside the generator's engine)."""
    return load_judge(config.judge, batch_size=config.judge_batch_size, device=config.device,
                      model=config.judge_model, vllm=config if config.backend == "vllm" else None,
                      shared=shared)


def judged_count(sets: EvalSets, judge: Judge) -> int:
    """Responses the judge reads: the safety sets', and the over-refusal sets' when it can tell refusals."""
    n = sum(len(s.rows) for s in sets.safety)
    if judge.can_judge_refusal:
        n += sum(len(s.rows) for s in sets.over_refusal)
    return n


# --------------------------------------------------------------------------- running

def evaluate_loaded(model, tokenizer, sets: EvalSets, config: EvalConfig, judge: Judge | None = None,
                    out: Path | None = None, *, model_name: str | None = None, overwrite: bool = False,
                    generator: Generator | None = None, rows_out: list[dict] | None = None) -> dict:
    """Evaluate an in-memory model (a `PreTrainedModel` or a `PeftModel`) on loaded sets.

    `judge` is reused when given (else loaded from `config.judge`); `generator(prompts, progress)`
    replaces the transformers backend when given (vLLM, or a fixed-response fake in tests); a
    `VllmGenerator` is closed once every response is in, before the judge loads.
    With sampled decoding (`config.temperature > 0`) the task sets' prompts, each repeated
    `config.num_samples` times, go to `generator(prompts, progress, sampling)` (a `Sampling`);
    safety and over-refusal sets are always decoded greedily (the two-argument call).
    Writes `out/metrics.json` and `out/generations.jsonl` atomically when `out` is given;
    `rows_out` (a list) gets the `generations.jsonl` rows (a sweep keeps them per trial).
    """
    t0 = time.perf_counter()
    if out is not None:
        check_out(Path(out), overwrite)
    name = model_name if model_name is not None else str(getattr(model, "name_or_path", "") or "")
    sampling = sampling_of(config)
    sampled = list(sets.task) if sampling is not None else []
    greedy = [*sets.safety, *sets.over_refusal, *([] if sampled else sets.task)]
    for s in greedy:  # greedy: one response a prompt, whatever num_samples says
        s.samples = 1
    for s in sampled:
        s.samples = config.num_samples
    with _progress(config.progress) as start:
        if generator is None:
            def generator(ps, progress, sampling=None):  # noqa: E306 - the default backend
                return generate_responses(model, tokenizer, ps, system_prompt=config.system_prompt,
                                          batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                          repetition_penalty=config.repetition_penalty, progress=progress,
                                          sampling=sampling)
        responses: dict[str, list[str]] = {}
        for group, how in ((greedy, None), (sampled, sampling)):
            prompts = [r.prompt for s in group for r in s.rows for _ in range(s.samples)]
            if not prompts:
                continue
            bar = start("sampling" if how else "generating", len(prompts))
            flat = generator(prompts, bar) if how is None else generator(prompts, bar, how)
            if len(flat) != len(prompts):
                raise RuntimeError(f"generator returned {len(flat)} responses for {len(prompts)} prompts")
            i = 0
            for s in group:
                responses[f"{s.kind}/{s.name}"] = flat[i:i + len(s.rows) * s.samples]
                i += len(s.rows) * s.samples
        t_gen = time.perf_counter() - t0
        if isinstance(generator, VllmGenerator):  # free the engine's memory before a judge loads
            generator.close()
        own_judge = judge is None
        judge = judge or config_judge(config)
        n_judged = judged_count(sets, judge)
        try:
            metrics, rows = score_responses(sets, responses, judge, model_name=name,
                                            progress=start("judging", n_judged) if n_judged else None,
                                            config=config)
        finally:
            if own_judge and hasattr(judge, "close"):  # a judge's vLLM engine
                judge.close()
    if sets.harness is not None:  # lm-eval tasks on the same model object (in a sweep: the live merge)
        metrics["task"].update(sets.harness.run(model, tokenizer, batch_size=config.batch_size,
                                                limit=config.limit))
    if rows_out is not None:
        rows_out.extend(rows)
    if out is not None:
        manifest = _manifest(name, sets, config, judge, t_gen, time.perf_counter() - t0)
        write_eval_dir(Path(out), metrics, rows, manifest, overwrite=overwrite)
    return metrics


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _manifest(model_name: str, sets: EvalSets, config: EvalConfig, judge: Judge, t_gen: float,
              t_total: float) -> dict:
    import torch
    import transformers

    from mergesafe import __version__

    return {
        "command": "eval",
        "model": model_name,
        "judge": config.judge,
        "inputs": [{"kind": s.kind, "name": s.name, "path": str(s.path), "sha256": sha256_path(s.path),
                    "n": len(s.rows), "scorer": s.scorer} for s in sets.all()],
        "config": config.model_dump(mode="json"),
        "versions": {"mergesafe": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()}
        | ({"lm_eval": _lm_eval_version()} if sets.harness is not None else {}),
        "timings_s": {"generation": round(t_gen, 3), "total": round(t_total, 3)},
    }


def evaluate(model: Any, out: str | Path | None = None, config: EvalConfig | None = None, tokenizer=None,
             adapter: str | Path | None = None, *, overwrite: bool = False, judge: Judge | None = None) -> dict:
    """One-shot evaluation of a model folder (optionally plus a PEFT adapter) or an in-memory model."""
    config = config or EvalConfig()
    out = Path(out) if out is not None else None
    if out is not None:
        judge_dir = judge_folder(config.judge) if isinstance(config.judge, str) else None
        check_not_input(out, [model if isinstance(model, (str, Path)) else None, adapter,
                              *config.safety, *config.over_refusal, *(p for p, _ in config.task),
                              judge_dir or None])
        check_out(out, overwrite)
    sets = load_eval_sets(config)
    if config.backend == "vllm":
        require_vllm()
        if not isinstance(model, (str, Path)):
            raise UserError("--backend vllm needs a model folder, not an in-memory model")
        path = Path(model)
        if not path.is_dir():
            raise UserError("model folder not found", path=path)
        ck = open_model(path, allow_pickle=config.allow_pickle)  # headers, config, no custom code
        adapter_dir = Path(adapter) if adapter is not None else None
        try:
            if adapter_dir is not None:
                if not (adapter_dir / "adapter_config.json").is_file():
                    raise UserError("adapter folder not found or has no adapter_config.json", adapter_dir)
                open_adapter(adapter_dir, ck, allow_pickle=config.allow_pickle)  # fits the model, or one line
        finally:
            ck.close()
        tok = tokenizer or load_tokenizer(adapter_dir if adapter_dir is not None and
                                          has_tokenizer_files(adapter_dir) else path)
        if config.dtype is None:  # the manifest records the dtype the engine runs in
            config = config.model_copy(update={"dtype": engine_dtype(config)})
        generator = VllmGenerator(path, tok, config, adapter=adapter_dir)  # starts on the first call
        try:
            return evaluate_loaded(None, tok, sets, config, judge=judge, out=out, overwrite=overwrite,
                                   model_name=str(path) if adapter is None else f"{model}+{adapter}",
                                   generator=generator)
        finally:
            generator.close()
    if isinstance(model, (str, Path)):
        name = str(model) if adapter is None else f"{model}+{adapter}"
        if judge is None:  # fail on a bad judge folder before loading the model
            check_judge_spec(config.judge)
        loaded, tok = load_for_generation(model, adapter, device=config.device,
                                          allow_pickle=config.allow_pickle)
        return evaluate_loaded(loaded, tokenizer or tok, sets, config, judge=judge, out=out, model_name=name,
                               overwrite=overwrite)
    resolve_device(config.device)
    if tokenizer is None:
        raise UserError("an in-memory model needs its tokenizer (tokenizer=...)")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return evaluate_loaded(model, tokenizer, sets, config, judge=judge, out=out, overwrite=overwrite)
