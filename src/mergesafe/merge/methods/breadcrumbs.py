"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): drop outliers and small values.

    δ_i = keep entries ranked (by |θ_i − θ₀|, largest first) after the top ⌊gamma·n⌋ and within
          the next ⌊density·n⌋ (the top drop shrinks if both do not fit)
    θ   = θ₀ + λ · Σ_i w_i δ_i                 (÷ Σ w_i if ``normalize``)

mergekit 0.1.5 ``breadcrumbs``: defaults ``density=1``, ``gamma=0.01``, ``normalize=False``,
``rescale=False``, ``lambda=1``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def breadcrumbs(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
                density: Sequence[float], gamma: Sequence[float], rescale: bool = False,
                rescale_norm: str = "l1", normalize: bool = False, lambda_: float = 1.0,
                normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.magnitude_outliers(d, density[i], norm, gamma[i]),
                     consensus=False, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
