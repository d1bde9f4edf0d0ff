"""Parameters of the merge-time safety-restoration methods (``--param NAME=VALUE``).

``RESTORE_METHODS`` names the methods that ``mergesafe merge`` runs through
:mod:`mergesafe.restore.apply` instead of the mergekit engine; :func:`validate_restore_params`
fills defaults, converts CLI strings and raises :class:`~mergesafe.errors.UserError` for an
unknown parameter or a bad value.  Defaults are those of each paper's code (see the kernel
modules).
"""

from __future__ import annotations

from typing import Any

from mergesafe.errors import UserError
from mergesafe.merge.registry import ParamSpec, unit_open_closed
from mergesafe.restore.resta import DEFAULT_GAMMA
from mergesafe.restore.safe_lora import DEFAULT_TOP_K
from mergesafe.restore.safemerge import DEFAULT_THRESHOLD, DEFAULT_W_SAFE, DEFAULT_W_TASK

#: the methods ``mergesafe merge`` hands to :mod:`mergesafe.restore.apply`
RESTORE_METHODS = ("safe_lora", "safemerge", "resta")


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    "safe_lora": (
        ParamSpec("top_k", int, DEFAULT_TOP_K, check=_non_negative,
                  help="project the k layers of lowest cosine (default 10)"),
        ParamSpec("threshold", float, None,
                  help="instead: project the layers with cosine <= threshold, rounded to 5 decimals (paper: 0.5)"),
    ),
    "safemerge": (
        ParamSpec("threshold", float, DEFAULT_THRESHOLD,
                  help="blend the layers with cosine < threshold (default 0.35)"),
        ParamSpec("task_weight", float, DEFAULT_W_TASK,
                  help="weight of the task update in a blended layer (default 0.8)"),
        ParamSpec("safety_weight", float, DEFAULT_W_SAFE,
                  help="weight of the safety update in a blended layer (default 0.2)"),
    ),
    "resta": (
        ParamSpec("gamma", float, DEFAULT_GAMMA,
                  help="weight γ of the safety vector pre − harmful (default 0.5)"),
        ParamSpec("density", float, None, check=unit_open_closed,
                  help="DARE on the task vector: fraction kept, in (0, 1] (default: no DARE)"),
    ),
}


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
        out[key] = None if value is None and p.default is None else p.coerce(value, method)
    if method == "safe_lora" and out.get("threshold") is not None and "top_k" in out:
        raise UserError("safe_lora: give --param top_k or --param threshold, not both")
    for p in specs.values():
        out.setdefault(p.name, p.default)
    if method == "safe_lora" and out["threshold"] is not None:
        out["top_k"] = None
    return out
