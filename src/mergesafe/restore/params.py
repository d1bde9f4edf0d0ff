"""Parameters of the merge-time safety-restoration methods (``--param NAME=VALUE``).

``RESTORE_METHODS`` names the methods that ``mergesafe merge`` runs through
:mod:`mergesafe.restore.apply` instead of the mergekit engine; :func:`validate_restore_params`
fills defaults, converts CLI strings and raises :class:`~mergesafe.errors.UserError` for an
unknown parameter or a bad value.  Defaults are those of each paper's code (see the kernel
modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from mergesafe.errors import UserError
from mergesafe.restore.resta import DEFAULT_GAMMA
from mergesafe.restore.safe_lora import DEFAULT_TOP_K
from mergesafe.restore.safemerge import DEFAULT_THRESHOLD, DEFAULT_W_SAFE, DEFAULT_W_TASK

#: the methods ``mergesafe merge`` hands to :mod:`mergesafe.restore.apply`
RESTORE_METHODS = ("safe_lora", "safemerge", "resta")


@dataclass(frozen=True)
class RestoreParam:
    name: str
    type: type  # int or float
    default: Any
    check: Callable[[float], str | None] | None = None
    help: str = ""


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit_open_closed(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


PARAMS: dict[str, tuple[RestoreParam, ...]] = {
    "safe_lora": (
        RestoreParam("top_k", int, DEFAULT_TOP_K, _non_negative,
                     "project the k layers of lowest cosine (default 10)"),
        RestoreParam("threshold", float, None, None,
                     "instead: project the layers with cosine < threshold (paper: 0.5)"),
    ),
    "safemerge": (
        RestoreParam("threshold", float, DEFAULT_THRESHOLD, None,
                     "blend the layers with cosine < threshold (default 0.35)"),
        RestoreParam("task_weight", float, DEFAULT_W_TASK, None,
                     "weight of the task update in a blended layer (default 0.8)"),
        RestoreParam("safety_weight", float, DEFAULT_W_SAFE, None,
                     "weight of the safety update in a blended layer (default 0.2)"),
    ),
    "resta": (
        RestoreParam("gamma", float, DEFAULT_GAMMA, None,
                     "weight γ of the safety vector pre − harmful (default 0.5)"),
        RestoreParam("density", float, None, _unit_open_closed,
                     "DARE on the task vector: fraction kept, in (0, 1] (default: no DARE)"),
    ),
}


def _coerce(p: RestoreParam, value: Any, method: str) -> Any:
    where = f"parameter {p.name!r} of {method}"
    if isinstance(value, bool) or isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected one number, got {value!r}")
    if p.type is int:
        try:
            v: float = int(str(value).strip()) if isinstance(value, str) else int(value)
            if not isinstance(value, str) and float(value) != v:
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise UserError(f"{where}: must be finite, got {value!r}")
    if p.check is not None and (msg := p.check(v)) is not None:
        raise UserError(f"{where} {msg}, got {value!r}")
    return v


def validate_restore_params(method: str, params: dict | None) -> dict[str, Any]:
    """Defaults filled in, values converted and checked; UserError for anything wrong.

    ``safe_lora``: ``top_k`` and ``threshold`` exclude each other (a threshold replaces the
    top-k selection).
    """
    if method not in PARAMS:
        raise UserError(f"unknown restoration method {method!r}; choose one of: "
                        f"{', '.join(RESTORE_METHODS)}")
    specs = {p.name: p for p in PARAMS[method]}
    given = dict(params or {})
    out: dict[str, Any] = {}
    for key, value in given.items():
        p = specs.get(key)
        if p is None:
            allowed = ", ".join(specs)
            raise UserError(f"unknown parameter {key!r} for method {method} (allowed: {allowed})")
        out[key] = None if value is None and p.default is None else _coerce(p, value, method)
    if method == "safe_lora" and out.get("threshold") is not None and "top_k" in out:
        raise UserError("safe_lora: give --param top_k or --param threshold, not both")
    for p in specs.values():
        out.setdefault(p.name, p.default)
    if method == "safe_lora" and out["threshold"] is not None:
        out["top_k"] = None
    return out


def params_help(method: str) -> str:
    """``name (help)`` for each parameter of ``method``, for ``--help`` texts."""
    return "; ".join(f"{p.name}: {p.help}" for p in PARAMS[method])
