"""RESTA (Bhardwaj et al. 2024, "Language Models are Homer Simpson! Safety Re-Alignment of
Fine-tuned Language Models through Task Arithmetic", ACL 2024).

With the aligned model ``θ_pre``, its fine-tune ``θ_post`` and ``θ_harmful`` (``θ_pre``
fine-tuned on harmful compliance data), the safety vector is ``δ_s = θ_pre − θ_harmful`` and::

    θ = θ_pre + DARE_p(θ_post − θ_pre) + γ·δ_s

``DARE_p`` (Yu et al. 2023) keeps each entry of the task vector with probability
``density = 1 − p`` and divides the kept ones by ``density``
(:func:`mergesafe.merge.methods.sparsify.bernoulli` with ``rescale_norm="density"``); no DARE
(``dare_density=None`` or ``1``) is plain task arithmetic.  Default ``γ = 0.5``, the safety
vector weight of the paper's released merge commands (``--weight2 0.5``).
"""

from __future__ import annotations

import torch

from mergesafe.merge.methods import sparsify as sp

DEFAULT_GAMMA = 0.5


def resta(pre: torch.Tensor, post: torch.Tensor, harmful: torch.Tensor,
          gamma: float = DEFAULT_GAMMA, dare_density: float | None = None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """``θ_pre + DARE(θ_post − θ_pre) + γ·(θ_pre − θ_harmful)`` as a new float32 tensor."""
    if not (pre.shape == post.shape == harmful.shape):
        raise ValueError(f"shape mismatch: {tuple(pre.shape)}, {tuple(post.shape)}, "
                         f"{tuple(harmful.shape)}")
    if dare_density is not None and not 0.0 < dare_density <= 1.0:
        raise ValueError(f"dare_density must be in (0, 1], got {dare_density}")
    p = pre.to(torch.float32)
    tau = post.to(torch.float32) - p
    if dare_density is not None and dare_density < 1.0:
        tau = sp.bernoulli(tau, dare_density, "density", generator)
    return p + tau + gamma * (p - harmful.to(torch.float32))
