"""TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

    δ_i = topk_{density}(θ_i − θ₀)        keep the ⌊density·n⌋ largest |δ| (at least one)
    m_i = [sign(w_i δ_i) = sign(Σ_j w_j δ_j)]
    θ   = θ₀ + λ · Σ_i m_i w_i δ_i / Σ_i m_i w_i      (the division only if ``normalize``)

mergekit 0.1.5 ``ties``: defaults ``density=1`` (no trimming), ``normalize=True``,
``rescale=False``, ``lambda=1``.  PEFT's variant divides by the number of agreeing models
instead: ``normalize_by="count"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods import sparsify as sp
from mergesafe.merge.methods._gta import gta_merge


def ties(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
         density: Sequence[float], normalize: bool = True, rescale: bool = False,
         rescale_norm: str = "l1", lambda_: float = 1.0, normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    norm = rescale_norm if rescale else None
    return gta_merge(base, others, weights,
                     sparsify=lambda i, d: sp.magnitude_(d, density[i], norm),  # d is fresh
                     consensus=True, normalize=normalize, lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
