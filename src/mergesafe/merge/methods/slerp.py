"""Spherical linear interpolation between two tensors (Shoemake 1985), mergekit's ``slerp``.

With a = θ₀ (base) and b = θ₁ flattened, â = a/‖a‖, b̂ = b/‖b‖ (norms below 1e-8 count as 1),
``d = clamp(â·b̂, −1, 1)``, ``Ω = arccos d``::

    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b        if |d| ≤ 0.9995
    θ = (1−t)·a + t·b                                   otherwise (nearly collinear)

mergekit 0.1.5 ``slerp``: exactly one base and one other model, ``t`` required (0 = base,
1 = other), float32 arithmetic.  Norms and the dot product are accumulated in float64 over
blocks in a fixed order (``_reduce``), so the result does not depend on the thread count (and
may differ from mergekit's by rounding, ~1e-7).  For a pre/post pair mergesafe uses t = λ.
"""

from __future__ import annotations

import torch

from mergesafe.merge.methods._reduce import dnorm, dsum_chunks

_CHUNK = 1024 * 1024
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS) -> torch.Tensor:
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[float(t)]], dtype=torch.float32)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    starts = range(0, a.shape[1], _CHUNK)
    norm_a = dnorm(a).reshape(1, 1)
    norm_b = dnorm(b).reshape(1, 1)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # normalise before multiplying (as mergekit) so that the raw dot cannot overflow
    dot = dsum_chunks((a[:, s:s + _CHUNK] / norm_a) * (b[:, s:s + _CHUNK] / norm_b)
                      for s in starts).reshape(1, 1).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + _CHUNK] = coef_a * a[:, s:s + _CHUNK] + coef_b * b[:, s:s + _CHUNK]
    return result.reshape(v0.shape)
