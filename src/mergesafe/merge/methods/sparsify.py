"""Sparsification of task vectors (τ = θ_post − θ_pre), as in mergekit 0.1.5 ``sparsify.py``.

All functions take and return float32 tensors and never modify their input, except
:func:`magnitude_` (in place, for task vectors the caller owns).

* :func:`magnitude` -- keep the ``k = max(1, ⌊density·n⌋)`` entries of largest |τ| (TIES).
* :func:`magnitude_outliers` -- drop the ``⌊gamma·n⌋`` largest |τ| (fewer if needed to keep
  ``⌊density·n⌋``), then keep the next ``⌊density·n⌋`` (Model Breadcrumbs).
* :func:`bernoulli` -- keep each entry with probability ``density`` (DARE).
* :func:`della_magprune` -- keep entry j of a row with probability
  ``p_j = density − ε + 2ε·rank_j/(m−1)``, ranks by |τ| within the row (DELLA MAGPRUNE).

Rescaling (``rescale_norm``): ``"l1"`` (mergekit's default: multiply the kept entries by
``‖τ‖₁ / ‖mask⊙τ‖₁``), ``"l2"``, ``"linf"`` (the same with those norms), ``"density"`` (PEFT and
the DARE paper: divide by ``density``), or ``None`` (no rescaling).

Selection by magnitude uses an exact two-level radix select on the float bits (O(n)) instead
of mergekit's full ``argsort`` (O(n log n)); it keeps exactly the same set of entries, except
that among entries of *equal* magnitude at the threshold (other than zero, where the choice
does not change the result) mergekit's unstable sort picks arbitrary ones and this picks the
lowest indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergesafe.merge.methods._reduce import dnorm, dsum_chunks

_EPS = 1e-7  # mergekit rescaled_masked_tensor eps


_CHUNK = 1 << 20  # elements per chunk: scratch stays in cache and out of peak memory
_ABS = 0x7FFFFFFF


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield slice(start, min(n, start + _CHUNK))


def _kth_largest_abs(flat: torch.Tensor, k: int) -> tuple[int, int, int]:
    """For a flat float32 tensor, the bit pattern ``v`` of the k-th largest magnitude and the
    numbers of magnitudes strictly above and equal to it.  Magnitude bits (sign cleared) order
    like the magnitudes, so two levels of 16-bit counting find ``v`` exactly in O(n), chunk by
    chunk, without materialising |x| or a full-size index."""
    bits = flat.view(torch.int32)
    n = bits.numel()
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for sl in _chunks(n):
        hist += torch.bincount(torch.bitwise_and(bits[sl], _ABS).bitwise_right_shift_(16),
                               minlength=1 << 15)
    desc = hist.flip(0).cumsum(0)  # counts from the top bucket down
    pos = int(torch.searchsorted(desc, torch.tensor(k, dtype=desc.dtype)))
    bucket = (1 << 15) - 1 - pos
    above = int(desc[pos - 1]) if pos > 0 else 0
    lows = []
    for sl in _chunks(n):
        a = torch.bitwise_and(bits[sl], _ABS)
        lows.append(torch.bitwise_and(a[a.bitwise_right_shift(16) == bucket], 0xFFFF))
    hist2 = torch.bincount(torch.cat(lows), minlength=1 << 16)
    desc2 = hist2.flip(0).cumsum(0)
    pos2 = int(torch.searchsorted(desc2, torch.tensor(k - above, dtype=desc2.dtype)))
    value = (bucket << 16) | ((1 << 16) - 1 - pos2)
    above2 = int(desc2[pos2 - 1]) if pos2 > 0 else 0
    equal = int(desc2[pos2]) - above2
    return value, above + above2, equal


def _select_largest(values: torch.Tensor, k: int) -> tuple[float, torch.Tensor | None]:
    """Describe the set of the ``k`` entries of largest magnitude of a float32 tensor as
    ``(threshold, drop)``: the entries with ``|x| >= threshold`` minus the flat indices ``drop``
    (equal magnitudes straddling the threshold: the highest indices are dropped, so ties are
    broken by index, lowest first).  A zero threshold means "the non-zero entries"."""
    flat = values.reshape(-1)
    value, above, equal = _kth_largest_abs(flat, k)
    thr = torch.tensor(value, dtype=torch.int32).view(torch.float32).item()
    if thr == 0.0 or above + equal <= k:
        return thr, None
    eq = torch.cat([(flat[sl].abs() == thr).nonzero().reshape(-1) + sl.start
                    for sl in _chunks(flat.numel())])
    return thr, eq[k - above:]


def topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries of largest magnitude.

    Ties at the threshold are broken by index (lowest first); when the threshold is zero only the
    non-zero entries are marked (a kept zero and a dropped zero give the same merge).
    """
    n = magnitudes.numel()
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    thr, drop = _select_largest(magnitudes, k)
    if thr == 0.0:
        return magnitudes != 0
    mask = magnitudes.abs() >= thr
    if drop is not None:
        mask.reshape(-1)[drop] = False
    return mask


def _keep_largest_(t: torch.Tensor, k: int) -> torch.Tensor:
    """In place: zero all but the ``k`` entries of largest magnitude (``t ⊙ topk_mask(t, k)``),
    chunk by chunk, without a full-size mask."""
    thr, drop = _select_largest(t, k)
    if thr > 0.0:
        # threshold(x, b, 0) keeps x > b; b = the largest float below thr gives |x| >= thr
        below = torch.nextafter(torch.tensor(thr), torch.tensor(0.0)).item()
        flat = t.reshape(-1)
        for sl in _chunks(flat.numel()):
            part = flat[sl]
            torch.copysign(F.threshold_(part.abs(), below, 0.0), part, out=part)
        if drop is not None:
            flat[drop] = 0.0
    return t


def rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, norm: str | None,
                    density: float = 1.0) -> torch.Tensor:
    """``tensor ⊙ mask``, rescaled so that its norm matches the original (mergekit
    ``rescaled_masked_tensor``); ``norm="density"`` divides by ``density`` instead (PEFT)."""
    masked = tensor * mask
    if norm is None:
        return masked
    if norm == "density":
        return masked / density
    if norm not in ("l1", "l2", "linf"):
        raise ValueError(f"unknown rescale norm {norm!r}")
    before, after = _norm(tensor, norm), _norm(masked, norm)
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale_norm: str | None = None) -> torch.Tensor:
    """TIES trimming: keep the ``max(1, ⌊density·n⌋)`` entries of largest magnitude."""
    if density >= 1:
        return tensor
    return magnitude_(tensor.clone(), density, rescale_norm)


def _norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.reshape(-1)
    if norm == "l1":
        return dsum_chunks(flat[sl].abs() for sl in _chunks(flat.numel()))
    if norm == "l2":
        return dnorm(t)
    return t.abs().max()


def magnitude_(tensor: torch.Tensor, density: float, rescale_norm: str | None = None) -> torch.Tensor:
    """:func:`magnitude` in place on ``tensor`` (for task vectors the caller owns)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return tensor.zero_()
    k = max(1, int(density * tensor.numel()))
    norm = rescale_norm if rescale_norm in ("l1", "l2", "linf") else None
    before = _norm(tensor, norm) if norm else None
    masked = _keep_largest_(tensor, k)
    if rescale_norm is None:
        return masked
    if rescale_norm == "density":
        return masked.div_(density)
    after = _norm(masked, norm)
    if before < _EPS or after < _EPS:
        return masked
    return masked.mul_(before / after)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm: str | None = None,
                       gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``⌊gamma·n⌋`` largest magnitudes (fewer when needed to keep
    ``⌊density·n⌋`` entries) and everything below the next ``⌊density·n⌋``."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    top_dropped = n - n_bot - target
    mask = topk_mask(tensor, top_dropped + target)
    if top_dropped > 0:
        mask &= ~topk_mask(tensor, top_dropped)
    return rescaled_masked(tensor, mask, rescale_norm, density)


def bernoulli(tensor: torch.Tensor, density: float, rescale_norm: str | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE drop-and-rescale: keep each entry independently with probability ``density``."""
    if density >= 1:
        return tensor
    mask = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) < density
    return rescaled_masked(tensor, mask, rescale_norm, density)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float,
                   rescale_norm: str | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """DELLA MAGPRUNE: per row, rank entries by magnitude (0 … m−1) and keep entry j with
    probability ``density − ε + 2ε·rank_j/(m−1)``; 1-D tensors are one row."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    index_shape = [1] * rows.dim()
    index_shape[1] = m
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(m, dtype=torch.float32).reshape(index_shape)
                   .expand_as(rows).contiguous())
    del order
    rank_norm = (ranks / (m - 1)).clamp(0, 1) if m > 1 else torch.zeros_like(ranks)
    del ranks
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    return rescaled_masked(rows, mask, rescale_norm, density).reshape(tensor.shape)
