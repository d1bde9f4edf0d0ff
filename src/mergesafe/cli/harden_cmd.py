"""Harden an aligned model before fine-tuning with LoX (Perin et al. 2025): extrapolate it along the top singular directions of its alignment update.

W = W_pre + A·Proj_K(W_pre − W_U) for every tensor, where Proj_K keeps the K largest singular directions of the alignment update (K = 0: the full update; 1-D tensors such as norms always take the full update). The output is a normal Hugging Face checkpoint (config, generation config, tokenizer and chat template copied from PRE), written atomically with a mergesafe.json manifest; fine-tune it as usual (`mergesafe finetune --model OUT ...`).

Memory and time: one exact thin SVD in float32 per 2-D tensor, about (out·in + min(out,in)·(out+in))·4 bytes besides that tensor's two inputs (the largest matrix, usually the embedding or LM head, sets the peak), O(out·in·min(out,in)) time each. K = 0 needs no SVD.

Example: mergesafe harden --pre Llama-3.1-8B-Instruct --unaligned Llama-3.1-8B --rank 4 --coef 0.5 --out hardened
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mergesafe.errors import UserError


def command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    pre: Annotated[Path, typer.Option("--pre", help="The aligned model to harden.")],
    unaligned: Annotated[Optional[Path], typer.Option(
        "--unaligned", help="The model before safety alignment (pre's base).")] = None,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", help="K: singular directions of the alignment update kept (0 = all).")] = None,
    coef: Annotated[Optional[float], typer.Option(
        "--coef", help="A: extrapolation coefficient α.")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="Output dtype: float32, float16 or bfloat16 (default: pre's).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Maximum shard size.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept .bin weights (loaded with torch.load(weights_only=True)).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Write the result even when a tensor has inf or NaN values "
        "(by default that is an error and nothing is written).")] = False,
) -> None:
    """Harden an aligned model with LoX before fine-tuning."""
    for flag, value in (("--unaligned PATH", unaligned), ("--rank K", rank), ("--coef A", coef)):
        if value is None:
            raise UserError(f"harden needs {flag}")
    from mergesafe.restore.harden import harden

    try:
        result = harden(pre, unaligned, out, rank, coef, dtype=dtype, shard_size=shard_size,
                        overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet,
                        allow_nonfinite=allow_nonfinite)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", None)
        print(f"mergesafe: error: {out}: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(128 + signum if signum else 130) from None
    print(f"hardened -> {result}")
