"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate the average of fine-tuned models
towards the base by an angle-dependent ratio.

For a base θ₀ and k ≥ 2 fine-tuned models θ_i, with offsets δ_i = θ_i − θ₀ (whole tensor, or per
row if ``filter_wise``) and cos θ the mean pairwise cosine of the offsets (clamped to [−1, 1])::

    t = k·cos θ / (1 + (k − 1)·cos θ)          (t = 0 where the denominator is ~0)
    θ = t · mean_i(θ_i) + (1 − t) · θ₀

mergekit 0.1.5 ``model_stock``: a base and at least two other models, ``filter_wise=False``.
Norms and dot products are accumulated in float64 independently of the thread count
(``_reduce``); results may differ from mergekit's by rounding (~1e-7).
mergesafe's pre/post use: ``--anchor`` (the unaligned base) is θ₀ and pre, post are the
fine-tuned models; or pre is θ₀ and several posts are the fine-tuned models.  No weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods._reduce import ddot, dnorm, dsum


def rownorm(t: torch.Tensor) -> torch.Tensor:
    """Norms over the last dimension, independent of the thread count."""
    if t.shape[0] == 1 and t.dim() == 2:
        return dnorm(t).reshape(1)
    return torch.sqrt((t * t).sum(dim=-1, dtype=torch.float64)).to(torch.float32)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[0] == 1 and a.dim() == 2:
        return dsum(a * b).reshape(1)
    return (a * b).sum(dim=-1, dtype=torch.float64).to(torch.float32)


def model_stock(base: torch.Tensor, others: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    if len(others) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    w_0, ws = base, list(others)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    if filter_wise:
        norms = [rownorm(o) for o in offsets]
    else:
        norms = [dnorm(o) for o in offsets]
    cos_thetas = []
    for i, oa in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            ob = offsets[j]
            dot = rowdot(oa, ob) if filter_wise else ddot(oa, ob)
            norm_product = norms[i] * norms[j]
            cos_thetas.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)
