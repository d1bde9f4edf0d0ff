"""DARE with TIES sign consensus (Yu et al. 2023, arXiv 2311.03099).

    δ_i = rescale(Bernoulli_{density} ⊙ (θ_i − θ₀))
    m_i = [sign(w_i δ_i) = sign(Σ_j w_j δ_j)]
    θ   = θ₀ + λ · Σ_i m_i w_i δ_i                 (÷ Σ_i m_i w_i if ``normalize``)

mergekit 0.1.5 ``dare_ties``: defaults ``density=1``, ``rescale=True`` (L1), ``normalize=False``,
``lambda=1``.  Random: the mask comes from ``generator``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def dare_ties(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
              density: Sequence[float], generator: torch.Generator, rescale: bool = True,
              rescale_norm: str = "l1", normalize: bool = False, lambda_: float = 1.0,
              normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.bernoulli(d, density[i], norm, generator),
                     consensus=True, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
