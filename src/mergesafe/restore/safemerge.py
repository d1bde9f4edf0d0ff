"""SafeMERGE (Djuhera et al. 2025, "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large
Language Models via Selective Layer-Wise Model Merging").

Per layer, the cosine ``cos_i`` of the task update against the safety subspace is the Safe LoRA
one (:func:`mergesafe.restore.safe_lora.update_cosine` / ``lora_update_cosine``: ``C_i`` from the
unaligned and aligned weights, never formed).  Layers that deviate from it are merged with a
safety adapter's update::

    ΔW_i = w_task·ΔW_i^task + w_safe·ΔW_i^safe    if round(cos_i, 5) < threshold
    ΔW_i = ΔW_i^task                              otherwise

Defaults: ``threshold = 0.35``, ``w_task = 0.8``, ``w_safe = 0.2``.  As in the reference code
(github.com/aladinD/SafeMERGE, ``utils.py``: ``compute_safelora_cos``, ``SafeLoRAMerger``): the
cosine is rounded to 5 decimals and compared with a strict ``<`` (Safe LoRA's own selection uses
``<=``); a layer whose alignment matrix ``V_i`` is zero gets ``C_i = 0`` there, hence cosine 0,
and is blended.  Here its cosine is ``None`` (undefined, as in Safe LoRA) and it is blended all
the same.

Choice: the blend is of the *full* updates ``ΔW = B·A`` (dense, ``out × in``), not PEFT's
separate averaging of the ``A`` and ``B`` factors.  Averaging the factors gives
``(w_t B_t + w_s B_s)(w_t A_t + w_s A_s)``, whose cross terms ``w_t w_s (B_t A_s + B_s A_t)``
are neither update; merging full updates is exactly the stated formula and also applies to full
fine-tunes.  Cost: one dense ``out × in`` float32 tensor per layer.
"""

from __future__ import annotations

import math

import torch

from mergesafe.restore.safe_lora import round_cosine

DEFAULT_THRESHOLD = 0.35
DEFAULT_W_TASK = 0.8
DEFAULT_W_SAFE = 0.2


def blends(cosine: float | None, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Whether SafeMERGE blends a layer: ``round(cos, 5) < threshold``; a ``None`` cosine (zero
    ``V``: the reference's ``C = 0``, cosine 0) is blended, a NaN one is not."""
    if cosine is None:
        return True
    if math.isnan(cosine):
        return False
    return round_cosine(cosine) < threshold


def safemerge_update(delta_task: torch.Tensor, delta_safe: torch.Tensor, cosine: float | None,
                     threshold: float = DEFAULT_THRESHOLD, w_task: float = DEFAULT_W_TASK,
                     w_safe: float = DEFAULT_W_SAFE) -> torch.Tensor:
    """``w_task·ΔW_task + w_safe·ΔW_safe`` when :func:`blends` (``round(cos, 5) < threshold``,
    or ``cosine`` is ``None``), else ``ΔW_task`` (float32)."""
    if delta_task.shape != delta_safe.shape:
        raise ValueError(f"shape mismatch: {tuple(delta_task.shape)} vs {tuple(delta_safe.shape)}")
    task = delta_task.to(torch.float32)
    if not blends(cosine, threshold):  # also keeps the task update for a NaN cosine
        return task
    return w_task * task + w_safe * delta_safe.to(torch.float32)
