"""Vocabulary tensors (one row per token) and how a post model's added tokens are reconciled.

When a post has more rows in an embedding / LM-head tensor than pre (added tokens), the shared
rows are merged and the new rows are taken from the (first) post, with one warning per merge.
Any other shape mismatch is a :class:`UserError` naming the tensor.  Used by the streaming map
(:mod:`mergesafe.stream`), the merge engine and the restoration methods.
"""

from __future__ import annotations

import re
import warnings

import torch

from mergesafe.errors import UserError

__all__ = ["VocabularyGrowthWarning", "is_vocab_tensor", "reset_vocab_warnings", "vocab_rows",
           "warn_vocab_growth"]

_VOCAB_NAMES = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|"
    r"shared|output|embeddings)(\.|$)")


class VocabularyGrowthWarning(UserWarning):
    """Post added tokens: new embedding rows were taken from post."""


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (input embedding, LM head)."""
    return bool(_VOCAB_NAMES.search(name))


def vocab_rows(name: str, tensors: list[torch.Size], pre_rows_index: int,
                labels: list[str]) -> tuple[int, int, int] | None:
    """``(n_shared, n_out, donor_index)`` when the shapes differ only by added vocabulary rows
    (pre has the fewest); ``None`` when all shapes agree; UserError otherwise."""
    first = tensors[pre_rows_index]
    if all(s == first for s in tensors):
        return None
    desc = ", ".join(f"{list(s)} in {label}" for s, label in zip(tensors, labels))
    if (not is_vocab_tensor(name) or any(len(s) != len(first) or len(s) == 0 for s in tensors)
            or any(s[1:] != first[1:] for s in tensors)):
        raise UserError(f"tensor {name!r}: shape mismatch ({desc})")
    n = first[0]
    rows = sorted({s[0] for s in tensors})
    if rows[0] != n or len(rows) != 2:
        raise UserError(f"tensor {name!r}: vocabulary sizes cannot be reconciled ({desc}); "
                        "post models must add the same number of tokens to pre")
    n_out = rows[1]
    donor = next(i for i, s in enumerate(tensors) if s[0] == n_out)
    return n, n_out, donor


_warned_vocab: set[tuple[int, int]] = set()


def reset_vocab_warnings() -> None:
    """Warn again (once) about each growth: called at the start of every streamed merge."""
    _warned_vocab.clear()


def warn_vocab_growth(n: int, n_out: int) -> None:
    if (n, n_out) in _warned_vocab:
        return
    _warned_vocab.add((n, n_out))
    warnings.warn(f"post has {n_out - n} more vocabulary rows than pre ({n} -> {n_out}): the shared "
                  "rows are merged, the new rows are taken from post", VocabularyGrowthWarning,
                  stacklevel=3)
