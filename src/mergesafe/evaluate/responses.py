"""`eval --responses FILE`: judge and score responses that were already generated; no model is loaded.

FILE is eval's own `generations.jsonl` (or any JSON Lines file with the same keys): one row per
response with `set`, `kind` (`safety` | `over_refusal` | `task`), `line` (the row's line in its set
file; for a folder of category files, its line across the sorted files), `prompt`, `response`,
and `sample` (0 … n−1) when a task prompt has several samples.

Matching.  The sets come from the config (`--safety`, `--over-refusal`, `--task`, with `--limit`,
`--sample`, `--seed` and the XSTest `safe` filter applied as for a normal eval).  Each of their
rows takes the rows of FILE with the same (kind, set name, line):
- the prompt must be equal, character for character, else `UserError` naming FILE and its line;
- a row of a set with no response in FILE is a `UserError` naming the set, the line and the prompt;
- a task row's samples must be exactly 0 … n−1, with the same n for every row of the set (n = 1
  when rows have no `sample` key); a safety or over-refusal row takes exactly one response;
- rows of FILE for other sets, or for lines the selection leaves out, are ignored: one warning
  counts them.
Generation settings (`--max-new-tokens`, `--num-samples`, ...) play no part; `--model`,
`--adapter` and `--lm-eval` need a model and are refused with `--responses`.

Output: the same `metrics.json` / `generations.jsonl` as a normal eval.  `metrics.json` `model`
is FILE's path; the manifest records FILE (path, sha256, rows used and ignored) and, when FILE
sits beside the `mergesafe.json` of the eval that wrote it, the model named there.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.checkpoint.inputs import check_not_input
from mergesafe.errors import UserError, echo
from mergesafe.evaluate.api import EvalSets, config_judge, judged_count, load_eval_sets, score_responses
from mergesafe.evaluate.config import EvalConfig
from mergesafe.evaluate.judges.base import Judge
from mergesafe.evaluate.judges.registry import judge_folder
from mergesafe.evaluate.output import check_out, sha256_path, write_eval_dir
from mergesafe.evaluate.prompts import PromptSet, read_records


@dataclass
class _Saved:
    """One response of FILE: where it is, its prompt and its text."""

    file_line: int
    prompt: str
    response: str


@dataclass
class MatchedResponses:
    """The responses of every set (keyed `kind/name`, task sets row-major over samples)."""

    responses: dict[str, list[str]]
    samples: dict[str, int]
    used: int = 0
    ignored: int = 0
    ignored_sets: list[str] = field(default_factory=list)


def _field(rec: dict[str, Any], key: str, kind: type, path: Path, line: int) -> Any:
    if key not in rec:
        raise UserError(f"line {line}: no {key!r} key (rows of eval's generations.jsonl have set, kind, "
                        "line, prompt, response)", path=path)
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"line {line}: {key!r} must be {'an integer' if kind is int else 'a string'}, "
                        f"got {echo(value, 60)}", path=path)
    return value


def _read_saved(path: Path, sets: EvalSets) -> tuple[dict[tuple[str, str], dict[int, dict[int, _Saved]]],
                                                     int, set[str]]:
    """FILE's rows for the selected rows of `sets`: {(kind, set): {line: {sample: saved}}}; plus the
    count of ignored rows and the names of the sets they belong to."""
    wanted = {(s.kind, s.name): {r.line for r in s.rows} for s in sets.all()}
    found: dict[tuple[str, str], dict[int, dict[int, _Saved]]] = {key: {} for key in wanted}
    ignored = 0
    ignored_sets: set[str] = set()
    for file_line, rec in read_records(path):
        kind = _field(rec, "kind", str, path, file_line)  # a kind no set has: ignored below
        name = _field(rec, "set", str, path, file_line)
        line = _field(rec, "line", int, path, file_line)
        if (kind, name) not in wanted or line not in wanted[(kind, name)]:
            ignored += 1
            ignored_sets.add(f"{kind}/{name}")
            continue
        prompt = _field(rec, "prompt", str, path, file_line)
        response = _field(rec, "response", str, path, file_line)
        sample = rec.get("sample")
        if sample is None:
            sample = 0
        elif not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
            raise UserError(f"line {file_line}: 'sample' must be an integer ≥ 0, got {echo(sample, 60)}",
                            path=path)
        by_sample = found[(kind, name)].setdefault(line, {})
        if sample in by_sample:
            raise UserError(f"line {file_line}: a second response for {kind} set {name!r} line {line} "
                            f"sample {sample} (the first is on line {by_sample[sample].file_line})", path=path)
        by_sample[sample] = _Saved(file_line, prompt, response)
    return found, ignored, ignored_sets


def _set_responses(s: PromptSet, saved: dict[int, dict[int, _Saved]], path: Path) -> tuple[list[str], int]:
    """The responses of one set in row order (row-major over samples) and its number of samples."""
    n_samples: int | None = None
    first_line = 0
    out: list[str] = []
    for r in s.rows:
        by_sample = saved.get(r.line)
        if not by_sample:
            raise UserError(f"no response for {s.kind.replace('_', '-')} set {s.name!r} line {r.line} "
                            f"(prompt {echo(r.prompt, 80)})", path=path)
        n = len(by_sample)
        if sorted(by_sample) != list(range(n)):
            missing = sorted(set(range(max(by_sample) + 1)) - set(by_sample))
            raise UserError(f"{s.kind.replace('_', '-')} set {s.name!r} line {r.line}: samples "
                            f"{sorted(by_sample)[:10]} but not {missing[:10]} (samples run 0 … n−1)", path=path)
        if s.kind != "task" and n != 1:
            raise UserError(f"{s.kind.replace('_', '-')} set {s.name!r} line {r.line}: {n} samples; "
                            "safety and over-refusal sets take one (greedy) response a prompt", path=path)
        if n_samples is None:
            n_samples, first_line = n, r.line
        elif n != n_samples:
            raise UserError(f"task set {s.name!r}: line {r.line} has {n} samples, line {first_line} has "
                            f"{n_samples} (every prompt of a set needs the same number)", path=path)
        for k in range(n):
            got = by_sample[k]
            if got.prompt != r.prompt:
                raise UserError(f"line {got.file_line}: the prompt differs from line {r.line} of {s.path} "
                                f"(set {s.name!r}): {echo(got.prompt, 80)} ≠ {echo(r.prompt, 80)}", path=path)
            out.append(got.response)
    return out, n_samples or 1


def match_responses(sets: EvalSets, path: str | Path) -> MatchedResponses:
    """Match FILE's rows to the rows of `sets` (see the module docstring); `UserError` on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise UserError("responses file not found" if not path.exists() else
                        "expected a file (eval's generations.jsonl)", path=path)
    found, ignored, ignored_sets = _read_saved(path, sets)
    matched = MatchedResponses(responses={}, samples={}, ignored=ignored, ignored_sets=sorted(ignored_sets))
    for s in sets.all():
        key = f"{s.kind}/{s.name}"
        matched.responses[key], matched.samples[key] = _set_responses(s, found[(s.kind, s.name)], path)
        matched.used += len(matched.responses[key])
    return matched


@contextmanager
def _judging_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None] | None]:
    if not enabled or total == 0:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("judging", total=total)
        yield lambda n: bar.advance(task, n)


def _source_model(path: Path) -> str | None:
    """The model named by the manifest of the eval folder that holds FILE, if there is one."""
    manifest = path.parent / "mergesafe.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("command") != "eval":
        return None
    earlier = data.get("responses")  # that eval scored saved responses too: follow it back
    model = earlier.get("generated_by") if isinstance(earlier, dict) else data.get("model")
    return model if isinstance(model, str) and model else None


def evaluate_responses(responses: str | Path, out: str | Path | None = None, config: EvalConfig | None = None,
                       *, overwrite: bool = False, judge: Judge | None = None) -> dict:
    """Judge and score the saved responses of FILE on the sets of `config`; write `out` when given.

    Returns the metrics dict of a normal evaluation (`model` = FILE's path).
    """
    t0 = time.perf_counter()
    config = config or EvalConfig()
    path = Path(responses)
    if getattr(config, "lm_eval", None):
        raise UserError("--lm-eval runs on a model; it cannot score saved responses (drop --responses)")
    out = Path(out) if out is not None else None
    if out is not None:
        judge_dir = judge_folder(config.judge) if isinstance(config.judge, str) else None
        check_not_input(out, [path, *config.safety, *config.over_refusal, *(p for p, _ in config.task),
                              judge_dir or None])
        check_out(out, overwrite)
    sets = load_eval_sets(config)
    matched = match_responses(sets, path)
    if matched.ignored:
        shown = ", ".join(matched.ignored_sets[:5]) + (" …" if len(matched.ignored_sets) > 5 else "")
        warnings.warn(f"{path}: {matched.ignored} rows ignored (sets or lines not selected: {shown})",
                      stacklevel=2)
    for s in sets.task:
        s.samples = matched.samples[f"task/{s.name}"]
    judge = judge or config_judge(config)
    n_judged = judged_count(sets, judge)
    with _judging_bar(config.progress, n_judged) as progress:
        metrics, rows = score_responses(sets, matched.responses, judge, model_name=str(path),
                                        progress=progress, config=config)
    if out is not None:
        manifest = _manifest(path, matched, sets, config, time.perf_counter() - t0)
        write_eval_dir(out, metrics, rows, manifest, overwrite=overwrite)
    return metrics


def _manifest(path: Path, matched: MatchedResponses, sets: EvalSets, config: EvalConfig,
              t_total: float) -> dict:
    """The manifest of a normal eval, with `responses` (the source) in place of generation."""
    import torch
    import transformers

    from mergesafe import __version__

    return {
        "command": "eval",
        "model": str(path),
        "responses": {"path": str(path), "sha256": sha256_path(path), "rows_used": matched.used,
                      "rows_ignored": matched.ignored, "generated_by": _source_model(path)},
        "judge": config.judge,
        "inputs": [{"kind": s.kind, "name": s.name, "path": str(s.path), "sha256": sha256_path(s.path),
                    "n": len(s.rows), "scorer": s.scorer} for s in sets.all()],
        "config": config.model_dump(mode="json"),
        "versions": {"mergesafe": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "timings_s": {"total": round(t_total, 3)},
    }
