"""`humaneval`: functional correctness of generated code, pass@k (Chen et al. 2021, arXiv 2107.03374).

A row is a HumanEval problem: `task_id`, `prompt` (the function signature and docstring, also
the prompt the model sees), `test` (defines `check(candidate)`), `entry_point` (the function's
name).  No reference column is needed.

The code of a response is its first fenced Python block (```python, ```py, ```python3 or an
untagged ```), else the whole response.  The program run is

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

so a completion may be either the body that continues the prompt or a whole function (which
replaces the prompt's).  Each sample runs in its own sandboxed process (`evaluate/sandbox.py`:
timeout `--humaneval-timeout`, setrlimit limits, own folder, stdin closed, network namespace
where the OS allows it); it passes only when the success marker printed after `check()` returns
is seen, so `exit(0)` or `os._exit(0)` before the tests fails.

metrics.json `task[SET]`: `score` = pass@(first k of `--pass-k`), `pass@K` for every K ≤ n
(the samples a problem; larger K are listed under `pass@k_omitted`), `n` problems, `samples`,
`passed` (passing samples, all problems).  Each sample's generations.jsonl row has `result`
(`passed`, `failed: AssertionError`, `timeout: timed out`, ...) and `task_id`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesafe.errors import UserError
from mergesafe.evaluate.metrics import pass_at_k
from mergesafe.evaluate.sandbox import Limits, run_programs

if TYPE_CHECKING:
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.prompts import PromptRow

NAME = "humaneval"
NEEDS_REFERENCE = False
REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")

_BLOCK = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")


def extract_code(response: str) -> str:
    """The first fenced Python (or untagged) block of `response`, else the whole response.

    Blocks are read in order, each up to its closing fence (an unclosed last block runs to the
    end: generation may stop at the token limit inside it)."""
    for m in _BLOCK.finditer(response):
        if m.group(1).lower() in _PYTHON_TAGS:
            return m.group(2)
    return response


def build_program(fields: dict[str, Any], response: str) -> str:
    """prompt + completion + test + check(entry_point), as HumanEval's harness builds it."""
    return (f"{fields['prompt']}{extract_code(response)}\n{fields['test']}\n"
            f"check({fields['entry_point']})\n")


def check_config(config: EvalConfig, path: Path | None = None) -> None:
    """The score is pass@ the first k: it needs at least k samples a problem."""
    first = config.pass_k[0]
    if first > config.num_samples:
        raise UserError(f"--pass-k: the score is pass@{first} (the first k), which needs "
                        f"--num-samples {first} or more (got {config.num_samples}); put a smaller k "
                        "first, e.g. --pass-k 1", path=path)


def score_batch(rows: Sequence[PromptRow], responses: Sequence[str], config: EvalConfig) -> list[dict]:
    """Run every sample in the sandbox; 1.0 when it passed, with its outcome in `result`."""
    programs = [build_program(r.fields or {}, resp) for r, resp in zip(rows, responses)]
    results = run_programs(programs, Limits(timeout_s=config.humaneval_timeout),
                           workers=config.humaneval_workers)
    return [{"score": 1.0 if res.passed else 0.0,
             "result": res.status if not res.detail else f"{res.status}: {res.detail}",
             "task_id": str((r.fields or {}).get("task_id", ""))}
            for r, res in zip(rows, results)]


def set_metrics(scores: list[list[float]], config: EvalConfig) -> dict[str, Any]:
    """pass@k (unbiased estimator, averaged over problems) for every k in `config.pass_k` ≤ n."""
    if not scores:
        return {"score": float("nan"), "samples": 0, "passed": 0}
    n = len(scores[0])
    counts = [int(sum(1 for s in row if s >= 1.0)) for row in scores]
    entry: dict[str, Any] = {"samples": n, "passed": sum(counts)}
    omitted = []
    for k in config.pass_k:
        if k > n:
            omitted.append(k)
            continue
        entry[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    if omitted:
        entry["pass@k_omitted"] = omitted
        entry["note"] = f"pass@k needs k <= samples per problem ({n}); omitted k = {omitted}"
    first = config.pass_k[0]
    entry["score"] = entry.get(f"pass@{first}", float("nan"))
    return entry

