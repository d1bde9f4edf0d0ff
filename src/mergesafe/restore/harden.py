"""``harden(pre, unaligned, out, rank, coef)``: LoX (Perin et al. 2025) on whole checkpoints.

A hardening step *before* fine-tuning: every floating tensor of the aligned model is
extrapolated along the top singular directions of its alignment update::

    W = W_pre + α·Proj_k(W_pre − W_U)        (see :func:`mergesafe.restore.lox.lox_harden`)

with ``k = rank`` (``0``: the full update) and ``α = coef``; 1-D tensors (norms, biases) always
take the full update.  Streamed tensor by tensor through the merge engine
(:func:`mergesafe.stream.execute`): the output is a normal Hugging Face checkpoint with
pre's config, generation config, tokenizer and chat template, written atomically, with a
``mergesafe.json`` manifest (``kind: harden``).  Fine-tune it as usual afterwards.

Memory and time: one exact thin SVD (float32) per 2-D tensor -- about
``(out·in + min(out, in)·(out + in))·4`` bytes besides that tensor's two inputs, and
``O(out·in·min(out, in))`` time -- so the largest matrix (usually the embedding or LM head)
sets the peak.  ``rank = 0`` needs no SVD and streams big tensors in row blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergesafe.checkpoint import check_output_dir, parse_size
from mergesafe.checkpoint.inputs import check_not_input, open_model
from mergesafe.errors import UserError
from mergesafe.restore.apply import validate_inputs
from mergesafe.stream import Source, StreamPlan, execute, parse_dtype, tokenizer_folder
from mergesafe.restore.lox import lox_harden

PathLike = str | Path


def harden(pre: PathLike, unaligned: PathLike, out: PathLike, rank: int, coef: float, *,
           dtype: str | torch.dtype | None = None, shard_size: str | int = "5GB",
           overwrite: bool = False, allow_pickle: bool = False, progress: bool = False,
           allow_nonfinite: bool = False) -> Path:
    """Write ``W_pre + coef·Proj_rank(W_pre − W_unaligned)`` for every tensor into ``out``.

    ``rank`` >= 0 (0 = full update), ``coef`` finite.  Bad input raises
    :class:`~mergesafe.errors.UserError` before anything is written.  Returns ``out``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"--rank must be an integer >= 0 (0 = the full alignment update), got {rank!r}")
    try:
        coef = float(coef)
    except (TypeError, ValueError):
        raise UserError(f"--coef must be a number, got {coef!r}") from None
    if not math.isfinite(coef):
        raise UserError(f"--coef must be finite, got {coef!r}")
    out_dtype = parse_dtype(dtype)
    size = parse_size(shard_size)
    check_not_input(out, [pre, unaligned])
    out = check_output_dir(out, overwrite)
    pre_src = Source("pre", open_model(pre, "--pre", allow_pickle), "pre")
    u_src = Source("unaligned", open_model(unaligned, "--unaligned", allow_pickle), "unaligned")
    validate_inputs(pre_src, [pre_src, u_src], out_dtype, "harden")

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        return lox_harden(loaded["pre"], loaded["unaligned"], rank, coef)

    manifest = {
        "method": "lox", "params": {"rank": rank, "coef": coef},
        "reference": "Perin et al. 2025, LoX: Low-Rank Extrapolation Robustifies LLM Safety "
                     "Against Fine-tuning",
        "inputs": {"pre": pre_src, "unaligned": u_src},
    }
    plan = StreamPlan(kind="harden", reference=pre_src, sources=[pre_src, u_src], compute=compute,
                      out_dtype=out_dtype, tokenizer_src=tokenizer_folder(pre_src, pre_src),
                      generation_src=[pre_src.dir], manifest=manifest, elementwise=rank == 0,
                      allow_nonfinite=allow_nonfinite)
    return execute(plan, out, overwrite=overwrite, shard_size=size, progress=progress)
