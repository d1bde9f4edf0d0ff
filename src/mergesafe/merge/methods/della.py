"""DELLA-merging (Deep et al. 2024, arXiv 2406.11617): magnitude-based sampling, TIES consensus.

    p_j = density − ε + 2ε · rank_j / (m − 1)      rank of |δ_j| within its row (0 = smallest)
    δ_i = rescale(Bernoulli_p ⊙ (θ_i − θ₀))
    m_i = [sign(w_i δ_i) = sign(Σ_j w_j δ_j)]
    θ   = θ₀ + λ · Σ_i m_i w_i δ_i / Σ_i m_i w_i   (the division only if ``normalize``)

mergekit 0.1.5 ``della``: defaults ``density=1``, ``epsilon=0.15``, ``normalize=True``,
``rescale=True`` (L1), ``lambda=1``; density ± epsilon must lie in (0, 1).  Random: the mask
comes from ``generator``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def della(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
          density: Sequence[float], epsilon: Sequence[float], generator: torch.Generator,
          rescale: bool = True, rescale_norm: str = "l1", normalize: bool = True,
          lambda_: float = 1.0, normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.della_magprune(d, density[i], epsilon[i], norm,
                                                             generator),
                     consensus=True, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
