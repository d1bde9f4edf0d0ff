"""Reductions whose results do not depend on the number of threads.

``torch.sum`` over a whole tensor splits the work across threads and adds the partial sums in
a thread-count-dependent order, so the last bits of a sum can change between a merge streamed
with one thread and the same merge in a sweep process with eight.  Merge methods that need a
sum (norm rescaling, SLERP, Model Stock) use :func:`dsum` instead: blocks of 4096 elements are
each reduced by a single thread (a reduction with many outputs is split over outputs), in
float64, and the block sums are added in a fixed order.
"""

from __future__ import annotations

from typing import Iterable

import torch

_BLOCK = 4096
_CHUNK = 1 << 20


def _dsum64(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    m = n - n % _BLOCK
    total = torch.zeros((), dtype=torch.float64)
    if m:
        rows = flat[:m].reshape(-1, _BLOCK).sum(dim=1, dtype=torch.float64)
        total = total + (_dsum64(rows) if rows.numel() > _BLOCK else rows.sum())
    if n - m:
        total = total + flat[m:].sum(dtype=torch.float64)  # < 4096 elements: one thread
    return total


def dsum(t: torch.Tensor) -> torch.Tensor:
    """Sum of all elements as a 0-dim float32 tensor, independent of the thread count."""
    return _dsum64(t.reshape(-1)).to(torch.float32)


def dsum_chunks(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """:func:`dsum` of the concatenation of ``parts`` (summed in order, float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in parts:
        total = total + _dsum64(p.reshape(-1))
    return total.to(torch.float32)


def chunks(flat: torch.Tensor, size: int = _CHUNK) -> Iterable[torch.Tensor]:
    n = flat.numel()
    for start in range(0, n, size):
        yield flat[start:start + size]


def dnorm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm (float32), independent of the thread count, with bounded scratch memory."""
    flat = t.reshape(-1)
    return torch.sqrt(dsum_chunks(c * c for c in chunks(flat)))


def ddot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product of two same-shaped tensors (float32), independent of the thread count."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return dsum_chunks(x * y for x, y in zip(chunks(fa), chunks(fb)))
