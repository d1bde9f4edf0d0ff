"""Merge methods by name, with their parameters (names, defaults, ranges) as in mergekit 0.1.5.

``get_method(name)`` -> :class:`MethodSpec`; ``METHODS`` maps every name to its spec;
``validate_params(method, params)`` fills defaults, checks types and ranges and raises
:class:`~mergesafe.errors.UserError` for anything wrong.

Parameters are *shared* (one value for the whole merge: ``normalize``, ``rescale``, ``lambda``,
``t``, ...) or *per model* (one value per post model, a scalar meaning "the same for all":
``density``, ``gamma``, ``epsilon``).  The per-model ``weight`` is not a parameter here: it is the
``weights`` argument (``--weight``).

mergesafe additions, off by default so that mergekit's numbers are reproduced:
``rescale_norm`` (``l1`` = mergekit; ``l2``, ``linf``; ``density`` = PEFT/DARE paper: divide the
kept entries by the density) and ``normalize_by`` (``weight`` = mergekit: divide by the sum of
the agreeing weights; ``count`` = PEFT: divide by the number of agreeing models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mergesafe.errors import UserError
from mergesafe.merge import methods as M

MISSING: Any = object()


def unit_open_closed(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _unit_closed_open(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: type
    default: Any = MISSING
    scope: str = "shared"  # "shared" | "model"
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def coerce(self, value: Any, method: str) -> Any:
        """Convert a CLI string, YAML scalar or Python value; raise UserError when invalid."""
        where = f"parameter {self.name!r} of {method}"
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{where}: expected true or false, got {value!r}")
        if self.type is int:
            try:
                if isinstance(value, bool):
                    raise ValueError
                v_int = int(value.strip()) if isinstance(value, str) else int(value)
                if not isinstance(value, str) and float(value) != v_int:
                    raise ValueError
            except (TypeError, ValueError):
                raise UserError(f"{where}: expected an integer, got {value!r}") from None
            if self.check is not None and (msg := self.check(v_int)) is not None:
                raise UserError(f"{where} {msg}, got {value!r}")
            return v_int
        if self.type is float:
            if isinstance(value, bool):
                raise UserError(f"{where}: expected a number, got {value!r}")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}: expected a number, got {value!r}") from None
            if not math.isfinite(v):
                raise UserError(f"{where}: must be finite, got {value!r}")
            if self.check is not None and (msg := self.check(v)) is not None:
                raise UserError(f"{where} {msg}, got {value!r}")
            return v
        text = str(value).strip()
        if self.choices and text not in self.choices:
            raise UserError(f"{where}: expected one of {', '.join(self.choices)}, got {value!r}")
        return text


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its kernel, parameters and input contract."""

    name: str
    kind: str  # "linear" | "gta" | "slerp" | "model_stock"
    fn: Callable
    params: tuple[ParamSpec, ...]
    reference: str
    random: bool = False
    min_models: int = 1  # models besides the base
    max_models: int | None = None
    uses_weight: bool = True
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def weight_divided_by_normalize(self) -> bool:
        """True when ``normalize`` divides by the weights (mergekit semantics)."""
        return self.kind == "gta"


def _gta_params(*, normalize: bool, rescale: bool, gamma: bool = False,
                epsilon: bool = False) -> tuple[ParamSpec, ...]:
    ps = [
        ParamSpec("density", float, 1.0, "model", check=unit_open_closed,
                  help="fraction of the task vector kept, in (0, 1]"),
        ParamSpec("normalize", bool, normalize, help="divide by the sum of the (agreeing) weights"),
        ParamSpec("rescale", bool, rescale, help="rescale kept entries to the task vector's norm"),
        ParamSpec("lambda", float, 1.0, help="scale of the merged task vector"),
        ParamSpec("int8_mask", bool, False, help="accepted for mergekit compatibility; no effect"),
        ParamSpec("rescale_norm", str, "l1", choices=("l1", "l2", "linf", "density"),
                  help="norm matched by rescale (l1 = mergekit; density = divide by density, PEFT)"),
        ParamSpec("normalize_by", str, "weight", choices=("weight", "count"),
                  help="normalize by summed weights (mergekit) or by model count (PEFT)"),
    ]
    if gamma:
        ps.append(ParamSpec("gamma", float, 0.01, "model", check=_unit_closed_open,
                            help="fraction of largest-magnitude outliers dropped, in [0, 1)"))
    if epsilon:
        ps.append(ParamSpec("epsilon", float, 0.15, "model", check=_unit_closed_open,
                            help="spread of keep probabilities; density ± epsilon in (0, 1)"))
    return tuple(ps)


def _gta(name, fn, ref, *, normalize, rescale, random=False, gamma=False, epsilon=False,
         consensus=False, sparsification=None):
    return MethodSpec(name, "gta", fn,
                      _gta_params(normalize=normalize, rescale=rescale, gamma=gamma, epsilon=epsilon),
                      ref, random=random,
                      extra={"consensus": consensus, "sparsification": sparsification})


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("linear", "linear", M.linear,
               (ParamSpec("normalize", bool, True, help="divide by the sum of the weights"),),
               "https://arxiv.org/abs/2203.05482"),
    _gta("task_arithmetic", M.task_arithmetic, "https://arxiv.org/abs/2212.04089",
         normalize=False, rescale=False),
    MethodSpec("slerp", "slerp", M.slerp,
               (ParamSpec("t", float, None, help="interpolation factor (default: the weight λ)"),),
               "https://en.wikipedia.org/wiki/Slerp", max_models=1),
    _gta("ties", M.ties, "https://arxiv.org/abs/2306.01708", normalize=True, rescale=False,
         consensus=True, sparsification="magnitude"),
    _gta("dare_linear", M.dare_linear, "https://arxiv.org/abs/2311.03099", normalize=False,
         rescale=True, random=True, sparsification="random"),
    _gta("dare_ties", M.dare_ties, "https://arxiv.org/abs/2311.03099", normalize=False, rescale=True,
         random=True, consensus=True, sparsification="random"),
    _gta("breadcrumbs", M.breadcrumbs, "https://arxiv.org/abs/2312.06795", normalize=False,
         rescale=False, gamma=True, sparsification="magnitude_outliers"),
    _gta("breadcrumbs_ties", M.breadcrumbs_ties, "https://arxiv.org/abs/2312.06795",
         normalize=False, rescale=False, gamma=True, consensus=True,
         sparsification="magnitude_outliers"),
    _gta("della", M.della, "https://arxiv.org/abs/2406.11617", normalize=True, rescale=True,
         random=True, epsilon=True, consensus=True, sparsification="della_magprune"),
    _gta("della_linear", M.della_linear, "https://arxiv.org/abs/2406.11617", normalize=False,
         rescale=True, random=True, epsilon=True, sparsification="della_magprune"),
    MethodSpec("model_stock", "model_stock", M.model_stock,
               (ParamSpec("filter_wise", bool, False, help="one ratio per row instead of per tensor"),),
               "https://arxiv.org/abs/2403.19522", min_models=2, uses_weight=False),
)}


def get_method(name: str) -> MethodSpec:
    """The spec of a method by its mergekit name; UserError for an unknown name."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


def check_della(method: str, density: float, epsilon: float, model: int | None = None) -> None:
    """DELLA's keep probabilities ``density ± epsilon`` must lie in (0, 1) -- for one post model.

    As mergekit 0.1.5's ``della_magprune`` (which checks each post model's own ``density`` and
    ``epsilon``): nothing is checked when ``density >= 1`` (the task vector is kept whole).
    ``model`` (0-based) names the post model in the message.
    """
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        which = f" for post model {model + 1}" if model is not None else ""
        raise UserError(f"{method}: density ± epsilon must lie in (0, 1){which} (density={density}, "
                        f"epsilon={epsilon}); lower epsilon")


def check_della_params(method: str, density: float | list[float],
                       epsilon: float | list[float]) -> None:
    """:func:`check_della` per post model: ``density[i]`` with ``epsilon[i]``, a scalar standing
    for every model.  Two lists of different lengths are refused (one value per post model)."""
    d_list, e_list = isinstance(density, list), isinstance(epsilon, list)
    if d_list and e_list and len(density) != len(epsilon):
        raise UserError(f"{method}: {len(density)} density values but {len(epsilon)} epsilon "
                        "values; give one value per post model (or one for all)")
    n = len(density) if d_list else len(epsilon) if e_list else 1
    dens = density if d_list else [density] * n
    eps = epsilon if e_list else [epsilon] * n
    for i, (d, e) in enumerate(zip(dens, eps)):
        check_della(method, d, e, i if (d_list or e_list) else None)


def validate_params(method: str, params: dict | None) -> dict:
    """Fill defaults, coerce and range-check ``params`` for ``method``; return a new dict.

    Per-model parameters may be a scalar or a list (one value per post model).  Raises
    :class:`UserError` for an unknown method or parameter, a bad value or a value out of range
    (e.g. ``density`` outside (0, 1]; DELLA's ``density ± epsilon`` outside (0, 1), checked per
    post model as mergekit does).
    """
    spec = get_method(method)
    params = dict(params or {})
    out: dict[str, Any] = {}
    for key, value in params.items():
        p = spec.param(key)
        if p is None:
            if key == "weight":
                raise UserError(f"parameter 'weight' of {method}: give weights with --weight "
                                "(the weights argument), not as a parameter")
            allowed = ", ".join(spec.param_names) or "none"
            raise UserError(f"unknown parameter {key!r} for method {method} (allowed: {allowed})")
        if p.scope == "model" and isinstance(value, (list, tuple)):
            if not value:
                raise UserError(f"parameter {key!r} of {method}: empty list")
            out[key] = [p.coerce(v, method) for v in value]
        elif value is None and p.default is None:
            out[key] = None
        else:
            out[key] = p.coerce(value, method)
    for p in spec.params:
        if p.name not in out:
            if p.required:
                raise UserError(f"method {method} needs parameter {p.name!r}")
            out[p.name] = p.default
    if "epsilon" in out:
        check_della_params(method, out["density"], out["epsilon"])
    return out
