"""The merge engine: one tensor (group) through one method, in memory.

The streamed merge of whole checkpoints (:mod:`mergesafe.stream`) calls the same functions
tensor by tensor, so it produces the same bits.  In-memory API (used by the sweep; keep stable)::

    merge_tensor(method, name, pre, posts, weights, params, seed, anchor=None) -> Tensor

Pair semantics (``--weight`` λ_i is the weight of post model i, for every method):

* ``linear``: inputs ``[pre, post_1, …]`` with weights ``[1 − Σλ, λ_1, …]`` (mergekit ``linear``),
  i.e. ``pre + Σ λ_i τ_i``.
* ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``: base = pre, per-model
  ``weight`` = λ_i, so one post gives ``pre + λ·sparsify(τ)``.  When ``normalize`` divides by the
  weights (mergekit's default for ``ties`` and ``della``) the normalised mixture is scaled by
  ``Σλ_i`` (mergekit ``lambda`` × Σλ_i): one post still gives ``pre + λ·sparsify(τ)``, and
  weights that sum to 1 give exactly mergekit's numbers.
* ``slerp``: one post, ``t = λ`` (or the ``t`` parameter).
* ``model_stock``: base = ``anchor`` and models ``[pre, post_1, …]``; without an anchor, base =
  pre and at least two posts.  Weights are not used.

Vocabulary growth: when a post has more rows in an embedding / LM-head tensor than pre (added
tokens), the shared rows are merged and the new rows are taken from the (first) post, with one
warning.  Any other shape mismatch raises a :class:`UserError` naming the tensor.

Random methods (DARE, DELLA) draw from a ``torch.Generator`` seeded from ``(seed, tensor name)``,
and the sums some methods need are reduced in a thread-independent order (``methods/_reduce``),
so a streamed merge and an in-memory merge of the same tensor give identical numbers, whatever
the number of threads of either process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mergesafe.checkpoint.vocab import (VocabularyGrowthWarning, is_vocab_tensor, vocab_rows,
                                       warn_vocab_growth)
from mergesafe.errors import UserError
from mergesafe.merge.registry import MethodSpec, check_della, get_method, validate_params

__all__ = ["merge_tensor", "merge_group", "PairPlan", "pair_plan", "tensor_seed",
           "VocabularyGrowthWarning", "is_vocab_tensor"]

def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: 63 bits of sha256("<seed>:<name>")."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# One tensor group through one method
# ---------------------------------------------------------------------------------------------

def _kernel(spec: MethodSpec, base: torch.Tensor | None, others: list[torch.Tensor],
            weights: Sequence[float], model_params: dict[str, list], shared: dict[str, Any],
            generator: torch.Generator | None, consume: bool = False) -> torch.Tensor:
    if spec.kind == "linear":
        return spec.fn(others, weights, normalize=shared["normalize"])
    if spec.kind == "slerp":
        return spec.fn(shared["t"], base, others[0])
    if spec.kind == "model_stock":
        return spec.fn(base, others, filter_wise=shared["filter_wise"])
    kwargs: dict[str, Any] = {
        "normalize": shared["normalize"], "lambda_": shared["lambda"],
        "normalize_by": shared["normalize_by"],
    }
    sparsification = spec.extra.get("sparsification")
    if sparsification is not None:
        kwargs["density"] = model_params["density"]
        kwargs["rescale"] = shared["rescale"]
        kwargs["rescale_norm"] = shared["rescale_norm"]
    if "gamma" in model_params and spec.param("gamma") is not None:
        kwargs["gamma"] = model_params["gamma"]
    if spec.param("epsilon") is not None:
        kwargs["epsilon"] = model_params["epsilon"]
    if spec.random:
        kwargs["generator"] = generator
    if consume:
        kwargs["overwrite_others"] = True
    return spec.fn(base, others, weights, **kwargs)


def merge_group(spec: MethodSpec | str, name: str, base: torch.Tensor | None,
                others: list[torch.Tensor], weights: Sequence[float],
                model_params: dict[str, list], shared: dict[str, Any], seed: int,
                *, pre_index: int = -1, labels: list[str] | None = None,
                consume: bool = False) -> torch.Tensor:
    """Merge one tensor in mergekit's form: a base (``None`` for ``linear``), other models with
    per-model ``weights`` and per-model parameter lists, shared parameters.  float32 in and out.

    ``pre_index`` says which input is "pre" for vocabulary growth: -1 = the base, otherwise an
    index into ``others``.  ``consume=True`` lets the kernel overwrite ``others`` (tensors the
    caller owns and drops afterwards; the streaming engine) -- same numbers, less memory.
    """
    if isinstance(spec, str):
        spec = get_method(spec)
    tensors = ([base] if base is not None else []) + list(others)
    shift = 1 if base is not None else 0
    ref = 0 if pre_index < 0 else pre_index + shift
    if labels is None:
        labels = (["base"] if base is not None else []) + [f"model {i + 1}" for i in range(len(others))]
    rows = vocab_rows(name, [t.shape for t in tensors], ref, labels)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name)) if spec.random else None
    if rows is None:
        return _kernel(spec, base, list(others), weights, model_params, shared, gen, consume)
    n, n_out, donor = rows
    if donor < shift:
        raise UserError(f"tensor {name!r}: the base has more vocabulary rows than the other models")
    warn_vocab_growth(n, n_out)
    merged = _kernel(spec, None if base is None else base[:n], [t[:n] for t in others], weights,
                     model_params, shared, gen)
    return torch.cat([merged, tensors[donor][n:]], dim=0)


# ---------------------------------------------------------------------------------------------
# Pair semantics
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairPlan:
    """How a pre/post(s)/anchor merge maps onto mergekit's form (see the module docstring)."""

    spec: MethodSpec
    weights: tuple[float, ...]  # the weights of the kernel's ``others`` (linear: pre first)
    model_params: dict[str, list] = field(hash=False)  # per model of ``others``
    shared: dict[str, Any] = field(hash=False)
    n_posts: int = 1
    anchor: bool = False

    def mergekit_equivalent(self) -> dict[str, Any]:
        """The mergekit parameters this plan corresponds to (for manifests and docs)."""
        out = {"weights": list(self.weights), **{k: v for k, v in self.shared.items()}}
        out.update({k: v for k, v in self.model_params.items()})
        return out


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise UserError(f"parameter {name!r}: {len(value)} values for {n} post models")
        return list(value)
    return [value] * n


def pair_plan(method: str, params: dict | None, weights: Sequence[float] | float, n_posts: int,
              anchor: bool = False, *, validated: bool = False) -> PairPlan:
    """Translate pair arguments into the kernel's form; raises UserError for bad combinations."""
    spec = get_method(method)
    p = dict(params or {}) if validated else validate_params(method, params)
    if n_posts < 1:
        raise UserError("at least one post model is needed")
    ws = [float(weights)] * n_posts if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(ws) == 1 and n_posts > 1:
        ws = ws * n_posts
    if len(ws) != n_posts:
        raise UserError(f"{len(ws)} weights for {n_posts} post models (give one --weight, or one per --post)")
    for w in ws:
        if w != w or w in (float("inf"), float("-inf")):
            raise UserError(f"weight must be finite, got {w}")
    if anchor and spec.kind != "model_stock":
        raise UserError(f"--anchor is only used by model_stock, not {method}")
    if spec.kind == "linear":
        kw = (1.0 - sum(ws), *ws)
        return PairPlan(spec, kw, {}, {"normalize": p["normalize"]}, n_posts, anchor)
    if spec.kind == "slerp":
        if n_posts != 1:
            raise UserError(f"slerp merges exactly two models; got {n_posts} post models")
        t = p.get("t")
        return PairPlan(spec, tuple(ws), {}, {"t": float(ws[0] if t is None else t)}, 1, anchor)
    if spec.kind == "model_stock":
        n_models = n_posts + (1 if anchor else 0)
        if n_models < 2:
            raise UserError("model_stock needs a third model: give --anchor PATH (the unaligned "
                            "base) or several --post models")
        return PairPlan(spec, tuple([1.0] * n_models), {}, {"filter_wise": p["filter_wise"]},
                        n_posts, anchor)
    # generalized task arithmetic
    model_params = {}
    for ps in spec.params:
        if ps.scope == "model":
            model_params[ps.name] = _as_list(p[ps.name], n_posts, ps.name)
    if "epsilon" in model_params:
        for d, e in zip(model_params["density"], model_params["epsilon"]):
            check_della(method, d, e)
    shared = {ps.name: p[ps.name] for ps in spec.params if ps.scope == "shared"}
    if shared["normalize"] and shared["normalize_by"] == "weight":
        shared["lambda"] = shared["lambda"] * sum(ws)
    return PairPlan(spec, tuple(ws), model_params, shared, n_posts, anchor)


def merge_pair(plan: PairPlan, name: str, pre: torch.Tensor, posts: Sequence[torch.Tensor],
               seed: int, anchor: torch.Tensor | None = None, *, consume: bool = False
               ) -> torch.Tensor:
    """Merge one tensor according to a :class:`PairPlan` (float32 in, float32 out).
    ``consume=True``: the caller owns ``posts`` and will not use them again."""
    posts = list(posts)
    if len(posts) != plan.n_posts:
        raise UserError(f"{len(posts)} post tensors for a plan with {plan.n_posts}")
    labels_posts = ["post"] if len(posts) == 1 else [f"post {i + 1}" for i in range(len(posts))]
    kind = plan.spec.kind
    if kind == "linear":
        return merge_group(plan.spec, name, None, [pre, *posts], plan.weights, plan.model_params,
                           plan.shared, seed, pre_index=0, labels=["pre", *labels_posts])
    if kind == "model_stock" and anchor is not None:
        return merge_group(plan.spec, name, anchor, [pre, *posts], plan.weights, plan.model_params,
                           plan.shared, seed, pre_index=0, labels=["anchor", "pre", *labels_posts])
    if anchor is not None and kind != "model_stock":
        raise UserError(f"--anchor is only used by model_stock, not {plan.spec.name}")
    return merge_group(plan.spec, name, pre, posts, plan.weights, plan.model_params, plan.shared,
                       seed, pre_index=-1, labels=["pre", *labels_posts], consume=consume)


def merge_tensor(method: str, name: str, pre: torch.Tensor, posts: list[torch.Tensor],
                 weights: list[float], params: dict, seed: int,
                 anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tensor in memory: float32 ``pre``, ``posts`` (and ``anchor`` for model_stock) in,
    float32 out.  Same numbers, bit for bit, as the streamed ``mergesafe merge`` before its
    output dtype cast; the same vocabulary-growth handling (new rows from post).  Raises
    :class:`UserError` for bad methods, parameters or shapes."""
    plan = pair_plan(method, params, weights, len(posts), anchor is not None)
    return merge_pair(plan, name, pre.float(), [p.float() for p in posts], seed,
                      None if anchor is None else anchor.float())
