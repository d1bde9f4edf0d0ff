"""Model Breadcrumbs with TIES sign consensus (arXiv 2312.06795 + 2306.01708).

    δ_i = breadcrumbs trim of θ_i − θ₀ (see ``breadcrumbs``)
    m_i = [sign(w_i δ_i) = sign(Σ_j w_j δ_j)]
    θ   = θ₀ + λ · Σ_i m_i w_i δ_i                 (÷ Σ_i m_i w_i if ``normalize``)

mergekit 0.1.5 ``breadcrumbs_ties``: defaults ``density=1``, ``gamma=0.01``, ``normalize=False``,
``rescale=False``, ``lambda=1``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def breadcrumbs_ties(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
                     density: Sequence[float], gamma: Sequence[float], rescale: bool = False,
                     rescale_norm: str = "l1", normalize: bool = False, lambda_: float = 1.0,
                     normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.magnitude_outliers(d, density[i], norm, gamma[i]),
                     consensus=True, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
