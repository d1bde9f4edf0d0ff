"""Safe LoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models", NeurIPS 2024).

Per weight matrix ``i`` (shape ``(out, in)``), with the unaligned base ``U`` and the aligned
model::

    V_i   = W_i^aligned − W_i^U                      (alignment matrix)
    C_i   = V_i V_iᵀ / ‖V_i‖_F                       ((out, out), the paper's "projection")
    cos_i = cos(vec(C_i ΔW_i), vec(ΔW_i))            (ΔW_i = B_i A_i, the LoRA update)

The layers with the lowest ``cos_i`` are projected, ``ΔW_i ← C_i ΔW_i``; the others keep their
update.  Selection, as in the paper's code: the ``10`` lowest (``select_layers_type="number"``,
``num_proj_layers=10``) or those with ``cos_i < 0.5`` (``"threshold"``, ``threshold=0.5``).

``C_i`` follows the paper exactly: divided by the Frobenius norm, it is an idempotent projector
only when ``V_i`` is rank 1 with ``‖V_i‖_F = 1``; in general it is a scaled operator on the
column space of ``V_i``, so ``C_i ΔW_i`` has the direction of the projection of ``ΔW_i`` onto
that space only when the nonzero singular values of ``V_i`` are equal (e.g. rank 1), and the
cosine is scale-invariant.

Memory: ``C_i`` is ``out × out`` float32 (``4·out²`` bytes, 64 MiB for ``out = 4096``) plus one
``out × in`` product.
"""

from __future__ import annotations

import torch

DEFAULT_TOP_K = 10
DEFAULT_THRESHOLD = 0.5
_EPS = 1e-12
_REL_ZERO = 1e-6


def _matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D weight matrix, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


def alignment_projector(w_aligned: torch.Tensor, w_unaligned: torch.Tensor) -> torch.Tensor:
    """``C = V Vᵀ / ‖V‖_F`` with ``V = W_aligned − W_unaligned`` (shape ``(out, out)``).

    A zero ``V`` (no alignment change in this layer) gives a zero ``C``.
    """
    a, u = _matrix(w_aligned, "w_aligned"), _matrix(w_unaligned, "w_unaligned")
    if a.shape != u.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(u.shape)}")
    v = a - u
    norm = torch.linalg.matrix_norm(v.double()).item()
    if norm < _EPS:
        return torch.zeros(v.shape[0], v.shape[0], dtype=torch.float32)
    return (v @ v.T) / norm


def projection_cosine(C: torch.Tensor, delta: torch.Tensor) -> float:
    """Cosine between ``vec(C·ΔW)`` and ``vec(ΔW)``.

    ``0.0`` when ``ΔW`` is zero or ``C`` annihilates it up to float32 resolution
    (``‖C·ΔW‖ ≤ 1e-6·‖C‖_F·‖ΔW‖_F``): the direction of a product that small is rounding noise.
    """
    c, d = _matrix(C, "C"), _matrix(delta, "delta")
    if c.shape != (d.shape[0], d.shape[0]):
        raise ValueError(f"C of shape {tuple(c.shape)} does not act on delta {tuple(d.shape)}")
    p = (c.double() @ d.double()).reshape(-1)
    d = d.reshape(-1).double()
    p_norm, d_norm = torch.linalg.vector_norm(p).item(), torch.linalg.vector_norm(d).item()
    c_norm = torch.linalg.matrix_norm(c.double()).item()
    if d_norm < _EPS or p_norm <= _REL_ZERO * c_norm * d_norm or p_norm < _EPS:
        return 0.0
    denom = p_norm * d_norm
    return float(torch.dot(p, d).item() / denom)


def select_layers(cosines: dict[str, float], top_k: int | None = DEFAULT_TOP_K,
                  threshold: float | None = None) -> set[str]:
    """The layers to project: those with ``cos < threshold`` when a threshold is given, else
    the ``top_k`` layers of lowest cosine (ties broken by name; all layers if ``top_k`` is
    ``None`` or larger than their number)."""
    if threshold is not None:
        return {name for name, c in cosines.items() if c < threshold}
    ranked = sorted(cosines.items(), key=lambda kv: (kv[1], kv[0]))
    if top_k is None:
        return {name for name, _ in ranked}
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return {name for name, _ in ranked[:top_k]}


def safe_lora_update(delta: torch.Tensor, C: torch.Tensor, project: bool) -> torch.Tensor:
    """``C·ΔW`` for a selected layer (``project``), else ``ΔW`` itself (as float32)."""
    d = _matrix(delta, "delta")
    if not project:
        return d
    c = _matrix(C, "C")
    if c.shape != (d.shape[0], d.shape[0]):
        raise ValueError(f"C of shape {tuple(c.shape)} does not act on delta {tuple(d.shape)}")
    return c @ d
