"""EMA in parameter space (Kim et al. 2025): during fine-tuning keep, from the pre weights,
an exponential moving average of the parameters updated after every optimizer step::

    θ̄₀ = θ_pre,    θ̄_t ← β·θ̄_{t−1} + (1 − β)·θ_t

so after ``n`` steps ``θ̄_n = βⁿ·θ_pre + (1 − β)·Σ_{t=1..n} β^{n−t}·θ_t``.  ``β`` has no default
here (``finetune --ema BETA`` passes it).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(avg: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                beta: float) -> None:
    """In place on ``avg``: ``θ̄ ← β·θ̄ + (1 − β)·θ`` for every name of ``avg``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    missing = avg.keys() - params.keys()
    if missing:
        raise KeyError(f"no parameter for {sorted(missing)}")
    for name, a in avg.items():
        p = params[name]
        if p.shape != a.shape:
            raise ValueError(f"{name}: shape mismatch {tuple(a.shape)} vs {tuple(p.shape)}")
        a.lerp_(p.detach().to(a.dtype), 1.0 - beta)
