"""Evaluation options shared by `eval` and `sweep`: one place that turns flags into an EvalConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergesafe.errors import UserError


def build_eval_config(*, safety: list[Path] | None, over_refusal: list[Path] | None,
                      task: list[Path] | None, scorer: list[str] | None, backend: str = "transformers",
                      **settings: Any):
    """Pair each `--task` with its `--scorer` (one scorer applies to all), validate, build EvalConfig."""
    from pydantic import ValidationError

    from mergesafe.evaluate.config import EvalConfig

    tasks = list(task or [])
    scorers = list(scorer or [])
    if tasks and not scorers:
        raise UserError("every --task needs a --scorer (numeric, exact, contains, choice)", path=tasks[0])
    if scorers and len(scorers) == 1:
        scorers = scorers * len(tasks)
    if len(scorers) != len(tasks):
        raise UserError(f"{len(tasks)} --task sets but {len(scorers)} --scorer values")
    if backend not in ("transformers", "vllm"):
        raise UserError(f"unknown backend {backend!r} (transformers or vllm)")
    try:
        return EvalConfig(safety=list(safety or []), over_refusal=list(over_refusal or []),
                          task=list(zip(tasks, scorers)), backend=backend, **settings)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "-".join(str(x) for x in first["loc"][:1]).replace("_", "-")
        raise UserError(f"--{flag}: {first['msg']}") from None
