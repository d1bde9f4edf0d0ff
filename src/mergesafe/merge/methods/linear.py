"""Linear merge / model soup (Wortsman et al. 2022, arXiv 2203.05482).

    θ = Σ_i w_i θ_i / Σ_i w_i        (without the division if ``normalize=False``)

mergekit 0.1.5 ``linear``: every input (the base too) has a ``weight``; ``normalize=True`` by
default; computed in float32 as ``0 + w₀θ₀ + w₁θ₁ + …`` then divided by ``Σw`` (float32).  For a
pre/post pair mergesafe gives pre the weight ``1 − λ`` and post ``λ``: ``θ = pre + λ·τ``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
           normalize: bool = True) -> torch.Tensor:
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear needs one weight per tensor")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    result = torch.mul(tensors[0], w[0])
    for t, c in zip(tensors[1:], w[1:]):
        result.addcmul_(t, c)
    if normalize:
        denominator = w.sum()
        if float(denominator) != 1.0:  # x / 1 is x: skip a pass over the tensor
            result.div_(denominator)
    return result
