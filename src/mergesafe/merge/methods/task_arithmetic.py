"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089).

    θ = θ₀ + λ · Σ_i w_i (θ_i − θ₀)          (÷ Σ_i w_i if ``normalize``)

mergekit 0.1.5 ``task_arithmetic``: defaults ``normalize=False``, ``lambda=1``; per-model
``weight`` (required).  With one post model and weight λ this is ``pre + λ·τ``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesafe.merge.methods._gta import gta_merge


def task_arithmetic(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lambda_: float = 1.0,
                    normalize_by: str = "weight", overwrite_others: bool = False) -> torch.Tensor:
    return gta_merge(base, others, weights, sparsify=None, consensus=False, normalize=normalize,
                     lambda_=lambda_, normalize_by=normalize_by,
                     overwrite_others=overwrite_others)
