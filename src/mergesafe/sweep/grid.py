"""The sweep grid: merge weights (λ) and per-method parameters, parsed from the command line."""

from __future__ import annotations

import math
from decimal import Decimal, DecimalException, InvalidOperation

from mergesafe.errors import UserError, one_line

MAX_WEIGHTS = 1000  # λ values in one grid
MAX_TRIALS = 5000  # methods × λ merges (each one a merge plus a full evaluation)


def parse_weights(spec: str) -> list[float]:
    """`"0.1:0.9:0.1"` (start:stop:step, stop included) or `"0.25,0.5,0.75"` → sorted unique λs in [0, 1].

    Decimal arithmetic keeps `0.1:0.9:0.1` at exactly nine points (0.1, 0.2, ..., 0.9).  A grid of
    more than `MAX_WEIGHTS` values is refused (counted before any value is made).
    """
    text = spec.strip()
    if not text:
        raise UserError("empty weight grid", path="--weights")
    shown = one_line(text, 100)
    try:
        if ":" in text:
            parts = [Decimal(p) for p in text.split(":")]
            if len(parts) != 3:
                raise UserError(f"'{shown}' is not start:stop:step", path="--weights")
            start, stop, step = parts
            if step <= 0:
                raise UserError(f"'{shown}': step must be positive", path="--weights")
            if stop < start:
                raise UserError(f"'{shown}': stop is below start", path="--weights")
            for v in (start, stop):
                if not v.is_finite() or not 0 <= v <= 1:
                    raise UserError(f"weight {one_line(str(v), 100)} is outside [0, 1] (0 = pre, 1 = post)",
                                    path="--weights")
            # counted before anything is made (a tiny step underflows to 0 here, not overflows)
            if stop - start >= step * MAX_WEIGHTS:
                raise UserError(f"'{shown}' makes more than {MAX_WEIGHTS} weights; use a larger step",
                                path="--weights")
            count = int((stop - start) / step) + 1
            values = [float(start + i * step) for i in range(count)]
        else:
            items = [p for p in text.split(",") if p.strip()]
            if len(items) > MAX_WEIGHTS:
                raise UserError(f"{len(items)} weights given; at most {MAX_WEIGHTS}", path="--weights")
            values = [float(Decimal(p)) for p in items]
    except (InvalidOperation, DecimalException, ValueError, OverflowError):
        raise UserError(f"'{shown}' is not a list of numbers or start:stop:step", path="--weights") from None
    if not values:
        raise UserError("empty weight grid", path="--weights")
    for v in values:
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise UserError(f"weight {one_line(str(v), 100)} is outside [0, 1] (0 = pre, 1 = post)",
                            path="--weights")
    return sorted({round(v, 10) for v in values})


def check_grid(methods: list[str], weights: list[float]) -> None:
    """Refuse a sweep of more than `MAX_TRIALS` merges (methods × weights)."""
    n = len(methods) * len(weights)
    if n > MAX_TRIALS:
        raise UserError(f"{len(methods)} methods × {len(weights)} weights = {n} merges; at most "
                        f"{MAX_TRIALS} (use fewer methods or a coarser grid)", path="--weights")


def parse_methods(spec: str | list[str]) -> list[str]:
    """`"linear,slerp"` → `["linear", "slerp"]` (order kept, duplicates dropped, names checked)."""
    from mergesafe.merge.registry import METHODS

    items = spec if isinstance(spec, list) else spec.split(",")
    methods: list[str] = []
    for item in items:
        name = item.strip()
        if not name:
            continue
        if name not in METHODS:
            raise UserError(f"unknown merge method '{one_line(name, 100)}' (known: {', '.join(sorted(METHODS))})",
                            path="--methods")
        if name not in methods:
            methods.append(name)
    if not methods:
        raise UserError("no merge method given", path="--methods")
    return methods


def parse_method_params(items: list[str], methods: list[str]) -> dict[str, dict[str, float | bool | str]]:
    """`["ties.density=0.5", "dare_linear.density=0.3"]` → `{"ties": {"density": 0.5}, ...}`.

    A parameter without a method prefix (`density=0.5`) applies to every method that takes it.
    """
    out: dict[str, dict[str, float | bool | str]] = {m: {} for m in methods}
    for item in items:
        if "=" not in item:
            raise UserError(f"'{item}' is not METHOD.NAME=VALUE", path="--param")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." in key:
            method, name = key.split(".", 1)
            if method not in out:
                raise UserError(f"'{item}': method '{method}' is not in --methods", path="--param")
            targets = [method]
        else:
            name, targets = key, methods
        for method in targets:
            out[method][name] = parse_value(raw.strip())
    return out


def parse_value(raw: str) -> float | bool | str:
    """`"true"` → True, `"0.5"` → 0.5, anything else stays a string (checked by the method's spec)."""
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return float(raw)
    except ValueError:
        return raw
