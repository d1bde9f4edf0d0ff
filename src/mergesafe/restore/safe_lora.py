"""Safe LoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models", NeurIPS 2024; reference code: github.com/IBM/SafeLoRA,
``model.py``).

Per weight matrix ``i`` (shape ``(out, in)``), with the unaligned base ``U`` and the aligned
model::

    V_i   = W_i^aligned − W_i^U                      (alignment matrix)
    C_i   = V_i V_iᵀ / ‖V_i‖_F                       ((out, out), the paper's "projection")
    cos_i = cos(vec(C_i ΔW_i), vec(ΔW_i))            (ΔW_i = scale·B_i A_i, the LoRA update)

The layers with the lowest ``cos_i`` are projected, ``ΔW_i ← C_i ΔW_i``; the others keep their
update.  Selection, as in the reference code: cosines rounded to 5 decimals
(``numpy.round(cos, 5)``), then the ``10`` lowest (``select_layers_type="number"``,
``num_proj_layers=10``) or those with ``cos_i <= 0.5`` (``"threshold"``, ``threshold=0.5``).

A layer whose ``V_i`` is zero (alignment did not change it) has no ``C_i``: the reference divides
by ``‖V_i‖_F = 0`` and gets a NaN cosine, which no selection picks.  Here its cosine is ``None``
and it is never selected: it keeps ``pre + ΔW``.

``C_i`` follows the paper exactly: divided by the Frobenius norm, it is an idempotent projector
only when ``V_i`` is rank 1 with ``‖V_i‖_F = 1``; in general it is a scaled operator on the
column space of ``V_i``, so ``C_i ΔW_i`` has the direction of the projection of ``ΔW_i`` onto
that space only when the nonzero singular values of ``V_i`` are equal (e.g. rank 1), and the
cosine is scale-invariant.

Memory: ``C_i`` (``out × out``, 0.8 GiB in float32 for ``out = 14336``) is never formed by the
functions the streaming code uses.  :func:`project_update` evaluates ``V(VᵀΔW)/‖V‖_F`` when
``out >= in`` (intermediate ``in × in``) and ``(VVᵀ)ΔW/‖V‖_F`` otherwise (intermediate
``out × out`` < ``out × in``): the intermediate is never larger than ``ΔW``.  For a LoRA update
:func:`project_lora_update` evaluates ``(V(VᵀB))A·scale/‖V‖_F`` (intermediates ``in × r`` and
``out × r``) and :func:`lora_update_cosine` needs only ``r × r`` Gram matrices, never ``ΔW``.
Products are in float64 (results in float32).  :func:`alignment_projector`,
:func:`projection_cosine` and :func:`safe_lora_update` are the explicit-``C`` forms of the same
formulas, for small matrices and tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy
import torch

DEFAULT_TOP_K = 10
DEFAULT_THRESHOLD = 0.5
#: the reference rounds every cosine to this many decimals before selecting
COSINE_DECIMALS = 5
_EPS = 1e-12
_REL_ZERO = 1e-6


def _matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D weight matrix, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


def _factors(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    v, b, a = _matrix(v, "V"), _matrix(b, "B"), _matrix(a, "A")
    if b.shape[0] != v.shape[0] or a.shape[1] != v.shape[1] or b.shape[1] != a.shape[0]:
        raise ValueError(f"LoRA factors B {tuple(b.shape)} and A {tuple(a.shape)} do not make an "
                         f"update of V's shape {tuple(v.shape)}")
    return v.double(), b.double(), a.double()


def _check_update(v: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, d = _matrix(v, "V"), _matrix(delta, "delta")
    if v.shape != d.shape:
        raise ValueError(f"V of shape {tuple(v.shape)} does not match delta {tuple(d.shape)}")
    return v.double(), d.double()


def _vvt_times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``V Vᵀ M`` (float64) with the smaller intermediate: ``Vᵀ M`` (``in × k``) or ``V Vᵀ``
    (``out × out``, only when that is smaller than ``in × k``)."""
    out, inn = v.shape
    if out * out < inn * m.shape[1]:
        return (v @ v.T) @ m
    return v @ (v.T @ m)


def _sq_norm(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def _cosine(inner: float, x_norm: float, d_norm: float, bound: float) -> float:
    """``inner / (‖x‖·‖ΔW‖)`` clamped to [0, 1] (the Safe LoRA cosine is never negative:
    ``⟨VVᵀΔW, ΔW⟩ = ‖VᵀΔW‖² ≥ 0``); 0 when ``ΔW`` is zero or ``‖x‖ ≤ 1e-6·bound`` (``x`` then
    is rounding noise: ``bound`` is the largest ``‖x‖`` can be)."""
    if d_norm < _EPS or x_norm <= _REL_ZERO * bound or x_norm < _EPS:
        return 0.0
    return min(max(inner / (x_norm * d_norm), 0.0), 1.0)


def alignment_matrix(w_aligned: torch.Tensor, w_unaligned: torch.Tensor) -> torch.Tensor:
    """``V = W_aligned − W_unaligned`` (float32, shape ``(out, in)``): the alignment change of
    one layer (Hsu et al. 2024; IBM/SafeLoRA ``get_aligned_matrix``)."""
    a, u = _matrix(w_aligned, "w_aligned"), _matrix(w_unaligned, "w_unaligned")
    if a.shape != u.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(u.shape)}")
    return a - u


def is_zero_alignment(v: torch.Tensor) -> bool:
    """True when ``V`` is zero: the layer has no ``C`` and is never projected."""
    return not bool(torch.any(v))


def update_cosine(v: torch.Tensor, delta: torch.Tensor) -> float | None:
    """``cos(vec(C·ΔW), vec(ΔW))`` with ``C = V Vᵀ / ‖V‖_F``, without forming ``C``.

    ``= ‖VᵀΔW‖_F² / (‖V(VᵀΔW)‖_F · ‖ΔW‖_F)`` (the ``1/‖V‖_F`` cancels), in [0, 1].
    ``None`` when ``V`` is zero (no alignment change: the reference's NaN); ``0.0`` when ``ΔW``
    is zero or ``C·ΔW`` vanishes up to rounding (``‖VVᵀΔW‖ ≤ 1e-6·‖V‖_F²·‖ΔW‖_F``).
    Hsu et al. 2024; IBM/SafeLoRA ``projected_weighted``.
    """
    v, d = _check_update(v, delta)
    if is_zero_alignment(v):
        return None
    x = _vvt_times(v, d)
    d_norm = math.sqrt(_sq_norm(d))
    inner = float(torch.dot(x.reshape(-1), d.reshape(-1)))
    return _cosine(inner, math.sqrt(_sq_norm(x)), d_norm, _sq_norm(v) * d_norm)


def lora_update_cosine(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float | None:
    """:func:`update_cosine` of ``ΔW = scale·B·A`` from the factors (``B``: ``out × r``, ``A``:
    ``r × in``), without forming ``ΔW`` or ``C`` (the cosine does not depend on ``scale``).

    With ``P = VᵀB``, ``Q = V P`` and ``G = A Aᵀ`` (all ``in × r``, ``out × r``, ``r × r``)::

        ⟨C·BA, BA⟩ ∝ Σ (PᵀP ∘ G),  ‖C·BA‖² ∝ Σ (QᵀQ ∘ G),  ‖BA‖² = Σ (BᵀB ∘ G)

    ``None`` when ``V`` is zero, ``0.0`` as in :func:`update_cosine`.  IBM/SafeLoRA
    ``projected_weighted`` (``cos(P·B·A, B·A)``).
    """
    v, b, a = _factors(v, b, a)
    if is_zero_alignment(v):
        return None
    p = v.T @ b
    q = v @ p
    g = a @ a.T
    inner = float(torch.sum((p.T @ p) * g))
    x_norm = math.sqrt(max(float(torch.sum((q.T @ q) * g)), 0.0))
    d_norm = math.sqrt(max(float(torch.sum((b.T @ b) * g)), 0.0))
    return _cosine(inner, x_norm, d_norm, _sq_norm(v) * d_norm)


def project_update(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``C·ΔW = V(VᵀΔW) / ‖V‖_F`` (float32) without the ``out × out`` ``C``: evaluated as
    ``V(VᵀΔW)`` when ``out >= in``, as ``(VVᵀ)ΔW`` when ``out < in`` (then ``VVᵀ`` is smaller
    than ``ΔW``).  Hsu et al. 2024; IBM/SafeLoRA ``projected_weighted``.  Raises ``ValueError``
    for a zero ``V`` (such a layer is never projected)."""
    v, d = _check_update(v, delta)
    if is_zero_alignment(v):
        raise ValueError("V is zero: a layer without alignment change is never projected")
    return (_vvt_times(v, d) / torch.linalg.matrix_norm(v)).to(torch.float32)


def project_lora_update(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                        scale: float = 1.0) -> torch.Tensor:
    """``C·(scale·B·A) = (V(VᵀB))·A·scale / ‖V‖_F`` (float32): the reference's projection of
    ``lora_B`` (``B ← C·B``), from the factors (intermediates ``in × r`` and ``out × r``).
    Raises ``ValueError`` for a zero ``V``."""
    v, b, a = _factors(v, b, a)
    if is_zero_alignment(v):
        raise ValueError("V is zero: a layer without alignment change is never projected")
    cb = (v @ (v.T @ b)) * (scale / float(torch.linalg.matrix_norm(v)))
    return (cb @ a).to(torch.float32)


def round_cosine(cosine: float | None) -> float | None:
    """The cosine as both reference codes compare it: ``numpy.round(cos, 5)``; ``None`` and NaN
    are returned as they are."""
    if cosine is None or math.isnan(cosine):
        return cosine
    return float(numpy.round(cosine, COSINE_DECIMALS))


def select_layers(cosines: Mapping[str, float | None], top_k: int | None = DEFAULT_TOP_K,
                  threshold: float | None = None) -> set[str]:
    """The layers to project.  Cosines are first rounded to 5 decimals (:func:`round_cosine`);
    layers whose cosine is ``None`` or NaN (a zero ``V``) are never selected.  With a threshold:
    those with ``round(cos) <= threshold`` (as the reference); else the ``top_k`` layers of lowest
    rounded cosine, ties broken by name (all layers if ``top_k`` is ``None`` or larger than their
    number).

    Difference from the reference's ``"number"`` mode, which projects every layer whose cosine is
    ``<=`` the k-th lowest and so more than k layers when cosines tie at the k-th: here exactly k.
    """
    ranked_all = {name: round_cosine(c) for name, c in cosines.items()}
    usable = {name: c for name, c in ranked_all.items() if c is not None and not math.isnan(c)}
    if threshold is not None:
        return {name for name, c in usable.items() if c <= threshold}
    ranked = sorted(usable.items(), key=lambda kv: (kv[1], kv[0]))
    if top_k is None:
        return {name for name, _ in ranked}
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return {name for name, _ in ranked[:top_k]}


# ---------------------------------------------------------------------------------------------
# Explicit-C forms (out × out): small matrices and tests only
# ---------------------------------------------------------------------------------------------

def alignment_projector(w_aligned: torch.Tensor, w_unaligned: torch.Tensor) -> torch.Tensor:
    """``C = V Vᵀ / ‖V‖_F`` with ``V = W_aligned − W_unaligned`` (shape ``(out, out)``, float32).

    Forms the ``out × out`` matrix: for small matrices and tests; the streaming code uses
    :func:`project_update` / :func:`update_cosine`.  A zero ``V`` (no alignment change in this
    layer) gives a zero ``C`` (the reference's would be NaN); such a layer is never projected.
    """
    v = alignment_matrix(w_aligned, w_unaligned)
    norm = torch.linalg.matrix_norm(v.double()).item()
    if norm < _EPS:
        return torch.zeros(v.shape[0], v.shape[0], dtype=torch.float32)
    return (v @ v.T) / norm


def projection_cosine(C: torch.Tensor, delta: torch.Tensor) -> float | None:
    """Cosine between ``vec(C·ΔW)`` and ``vec(ΔW)`` for an explicit ``C``.

    ``None`` when ``C`` is zero (a layer without alignment change); ``0.0`` when ``ΔW`` is zero
    or ``C`` annihilates it up to rounding (``‖C·ΔW‖ ≤ 1e-6·‖C‖_F·‖ΔW‖_F``).  Not clamped: for a
    ``C`` that is not of the form ``VVᵀ/‖V‖`` the cosine may be negative.
    """
    c, d = _matrix(C, "C"), _matrix(delta, "delta")
    if c.shape != (d.shape[0], d.shape[0]):
        raise ValueError(f"C of shape {tuple(c.shape)} does not act on delta {tuple(d.shape)}")
    if is_zero_alignment(c):
        return None
    p = (c.double() @ d.double()).reshape(-1)
    d = d.reshape(-1).double()
    p_norm, d_norm = torch.linalg.vector_norm(p).item(), torch.linalg.vector_norm(d).item()
    c_norm = torch.linalg.matrix_norm(c.double()).item()
    if d_norm < _EPS or p_norm <= _REL_ZERO * c_norm * d_norm or p_norm < _EPS:
        return 0.0
    return float(torch.dot(p, d).item() / (p_norm * d_norm))


def safe_lora_update(delta: torch.Tensor, C: torch.Tensor, project: bool) -> torch.Tensor:
    """``C·ΔW`` for a selected layer (``project``), else ``ΔW`` itself (as float32), for an
    explicit ``C``."""
    d = _matrix(delta, "delta")
    if not project:
        return d
    c = _matrix(C, "C")
    if c.shape != (d.shape[0], d.shape[0]):
        raise ValueError(f"C of shape {tuple(c.shape)} does not act on delta {tuple(d.shape)}")
    return c @ d
