"""Generalized task arithmetic: the shared core of task_arithmetic, TIES, DARE, Breadcrumbs and
DELLA (mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group``; PEFT ``merge_utils`` is the
style model).

For a base θ₀ and models θ₁…θ_k with weights w_i::

    δ_i   = sparsify(θ_i − θ₀)                       (per-model density, gamma, epsilon)
    δ_i  ← w_i · δ_i
    m_i   = [sign(δ_i) = sign(Σ_j δ_j)]               (consensus methods only; sign(0) = +)
    mix   = Σ_i m_i ⊙ δ_i                             (m_i = 1 without consensus)
    mix  ← mix / D   if normalize,  D = Σ_i w_i m_i (elementwise; 0 → 1), or Σ_i w_i (|·|<1e-8 → 1)
                                    or, with normalize_by="count", Σ_i m_i (PEFT's disjoint merge)
    θ     = θ₀ + λ · mix                               (λ = the ``lambda`` parameter)

With one model and consensus, m₁ = [δ₁ ≠ 0], so the stacked computation reduces to a scalar
multiple of δ₁ and is done in place without stacking (identical results up to rounding).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]


def gta_merge(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
              sparsify: Sparsifier | None, consensus: bool, normalize: bool, lambda_: float = 1.0,
              normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    """The generalized task-arithmetic merge above.  ``sparsify(i, delta)`` trims model i's task
    vector (``None``: keep all).  Inputs are float32 and are not modified, unless
    ``overwrite_others`` says the caller will not use ``others`` again (the streaming engine's
    freshly read tensors): their memory then holds the task vectors (same numbers, less memory)."""
    k = len(others)
    if k == 0:
        return base.clone()
    if k == 1:
        return _gta_single(base, others[0], float(weights[0]), overwrite=overwrite_others,
                           sparsify=sparsify,
                           consensus=consensus, normalize=normalize, lambda_=lambda_,
                           normalize_by=normalize_by)
    deltas = base.new_empty((k, *base.shape))
    for i, t in enumerate(others):
        d = t - base
        if sparsify is not None:
            d = sparsify(i, d)
        deltas[i] = d
        del d
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    deltas.mul_(w)
    if consensus:
        sign_weight = deltas.sum(dim=0)
        majority = (sign_weight >= 0).to(deltas.dtype) * 2 - 1
        del sign_weight
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        if normalize_by == "count":
            divisor = mask.sum(dim=0).to(deltas.dtype).clamp(min=1.0)
        else:
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        if normalize_by == "count":
            divisor = torch.tensor(float(k), dtype=deltas.dtype)
        else:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed


def _gta_single(base, other, weight, *, overwrite, sparsify, consensus, normalize, lambda_,
                normalize_by):
    d = other.sub_(base) if overwrite else other - base
    if sparsify is not None:
        d = sparsify(0, d)
    # w·δ, masked by consensus (δ ≠ 0: no effect on the values), divided by the divisor
    # (w where δ ≠ 0 -- the zeros stay zero whatever they are divided by), times λ.
    coef = torch.tensor(weight, dtype=torch.float32)
    if normalize:
        if normalize_by == "count":
            div = torch.tensor(1.0)
        elif consensus:
            div = coef if weight != 0 else torch.tensor(1.0)
        else:
            div = coef if abs(float(coef)) >= 1e-8 else torch.tensor(1.0)
        scale = (coef / div) * lambda_ if lambda_ != 1 else coef / div
    else:
        scale = coef * lambda_ if lambda_ != 1 else coef
    s = float(scale)
    if s == 0.0:
        return base.clone()
    return torch.add(base, d, alpha=s, out=d)  # d is ours (or may be overwritten): reuse it
