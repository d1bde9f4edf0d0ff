"""DELLA without sign consensus (arXiv 2406.11617), mergekit's ``della_linear``.

    p_j = density − ε + 2ε · rank_j / (m − 1)
    δ_i = rescale(Bernoulli_p ⊙ (θ_i − θ₀))
    θ   = θ₀ + λ · Σ_i w_i δ_i                     (÷ Σ w_i if ``normalize``)

mergekit 0.1.5 ``della_linear``: defaults ``density=1``, ``epsilon=0.15``, ``normalize=False``,
``rescale=True`` (L1), ``lambda=1``.  Random: the mask comes from ``generator``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def della_linear(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
                 density: Sequence[float], epsilon: Sequence[float], generator: torch.Generator,
                 rescale: bool = True, rescale_norm: str = "l1", normalize: bool = False,
                 lambda_: float = 1.0, normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.della_magprune(d, density[i], epsilon[i], norm,
                                                             generator),
                     consensus=False, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
