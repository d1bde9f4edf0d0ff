"""LoX (Perin et al. 2025, "LoX: Low-Rank Extrapolation Robustifies LLM Safety Against
Fine-tuning").

A hardening step before fine-tuning: extrapolate the aligned model along the top singular
directions of its alignment update ``ΔW_A = W_pre − W_U``::

    W = W_pre + α·Proj_k(ΔW_A),    Proj_k(ΔW_A) = Σ_{j≤k} σ_j u_j v_jᵀ

(``U_k S_k V_kᵀ``, the best rank-k approximation).  ``rank = 0`` (or ``k ≥ min(out, in)``) means
the full update, ``W = W_pre + α·(W_pre − W_U)``; 1-D tensors (biases, norms) always take the
full update.  ``rank`` and ``coef`` (``α``) have no default here: the caller passes them.

Memory and time: an exact thin SVD (``torch.linalg.svd``, float32) per 2-D tensor, about
``(out·in + min(out, in)·(out + in))·4`` bytes besides the inputs.
"""

from __future__ import annotations

import torch


def lox_harden(w_pre: torch.Tensor, w_unaligned: torch.Tensor, rank: int,
               coef: float) -> torch.Tensor:
    """``W_pre + coef·Proj_rank(W_pre − W_unaligned)`` as a new float32 tensor."""
    if w_pre.shape != w_unaligned.shape:
        raise ValueError(f"shape mismatch: {tuple(w_pre.shape)} vs {tuple(w_unaligned.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    pre = w_pre.to(torch.float32)
    delta = pre - w_unaligned.to(torch.float32)
    if rank == 0 or delta.dim() != 2 or rank >= min(delta.shape):
        return pre + coef * delta
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return pre + coef * low
