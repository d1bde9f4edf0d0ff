"""Merge pre- and post-tuning weights (or run a mergekit YAML config), streaming tensor by tensor.

Examples:

  mergesafe merge --pre PRE --post POST --method linear --weight 0.6 --out OUT

  mergesafe merge --pre PRE --post POST --method ties --weight 0.6 --param density=0.5 --out OUT

  mergesafe merge --pre PRE --post LORA_ADAPTER --weight 0.6 --out-format adapter --out OUT

  mergesafe merge --config merge.yaml --out OUT

Safety-restoration methods (one --post, no --weight; see README "Related safety-restoration methods"):

  mergesafe merge --method safe_lora --pre PRE --post ADAPTER --unaligned U --out OUT [--param top_k=10 | --param threshold=0.5]

  mergesafe merge --method safemerge --pre PRE --post ADAPTER --safety-adapter S --unaligned U --out OUT [--param threshold=0.35 --param task_weight=0.8 --param safety_weight=0.2]

  mergesafe merge --method resta --pre PRE --post POST --harmful H --out OUT [--param gamma=0.5 --param density=0.9 --seed 0]

safe_lora (Hsu et al. 2024): per layer C = V·Vᵀ/‖V‖_F with V = W_pre − W_unaligned; the layers whose update ΔW = post − pre has the lowest cosine between C·ΔW and ΔW (rounded to 5 decimals; with threshold: cosine <= threshold) get pre + C·ΔW, the others pre + ΔW; a layer with V = 0 is never projected. Two streaming passes (cosines, then writing). safemerge (Djuhera et al. 2025): the same cosine; layers below the threshold get pre + task_weight·ΔW_task + safety_weight·ΔW_safe, merging the full updates ΔW = scale·B·A (not PEFT's separate averaging of the A and B factors, whose cross terms are neither update). A layer is a 2-D weight matrix other than the embedding / LM head whose update is not zero (for a LoRA post: the LoRA targets); every other tensor keeps post. Memory of both: one layer's pre, unaligned and update, plus C·ΔW (4·out·in bytes), computed as V(VᵀΔW)/‖V‖_F (for a LoRA post from B and A) without forming C, except when out < in, where the smaller out×out C is used. resta (Bhardwaj et al. 2024): pre + DARE(post − pre) + gamma·(pre − harmful) for every tensor, DARE only with --param density (seeded by --seed); memory: three tensors at a time.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from mergesafe.errors import UserError

METHODS_HELP = ("linear, task_arithmetic, slerp, ties, dare_linear, dare_ties, breadcrumbs, "
                "breadcrumbs_ties, della, della_linear, model_stock; safety restoration: "
                "safe_lora, safemerge, resta")
RESTORE_METHODS = ("safe_lora", "safemerge", "resta")


def _parse_params(items: list[str] | None) -> dict:
    params: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--param expects NAME=VALUE, got {item!r}")
        if key in params:  # repeated: one value per post model
            prev = params[key]
            params[key] = (prev if isinstance(prev, list) else [prev]) + [value.strip()]
        else:
            params[key] = value.strip()
    return params


def command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    pre: Annotated[Optional[Path], typer.Option("--pre", help="Model before fine-tuning.")] = None,
    post: Annotated[Optional[list[Path]], typer.Option(
        "--post", help="Model after fine-tuning, or a PEFT LoRA adapter of pre (repeatable).")] = None,
    method: Annotated[str, typer.Option("--method", help=f"Merge method: {METHODS_HELP}.")] = "linear",
    weight: Annotated[Optional[list[float]], typer.Option(
        "--weight", help="λ, the weight of the post model (0 = pre, 1 = post); one per --post "
        "or one for all. Default 0.5.")] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", help="Method parameter NAME=VALUE (density, epsilon, gamma, lambda, normalize, "
        "rescale, t, ...); repeat a name to give one value per post.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for DARE and DELLA.")] = 0,
    anchor: Annotated[Optional[Path], typer.Option(
        "--anchor", help="model_stock only: the unaligned base model.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="A mergekit YAML config (models/base_model/merge_method/parameters).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="Output dtype: float32, float16 or bfloat16 (default: pre's).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Maximum shard size.")] = "5GB",
    tokenizer_from: Annotated[str, typer.Option(
        "--tokenizer-from", help="Copy tokenizer and chat template from 'post' or 'pre'.")] = "post",
    out_format: Annotated[str, typer.Option(
        "--out-format", help="'full' (a model) or 'adapter' (a LoRA adapter scaled by λ; LoRA "
        "post with linear/task_arithmetic only).")] = "full",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept .bin weights (loaded with torch.load(weights_only=True)).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Write the merge even when a tensor has inf or NaN values "
        "(by default that is an error and nothing is written).")] = False,
    unaligned: Annotated[Optional[Path], typer.Option(
        "--unaligned", help="safe_lora, safemerge: the model before safety alignment (pre's "
        "base).")] = None,
    safety_adapter: Annotated[Optional[Path], typer.Option(
        "--safety-adapter", help="safemerge: a LoRA adapter of pre (or a full model) trained "
        "on safety data.")] = None,
    harmful: Annotated[Optional[Path], typer.Option(
        "--harmful", help="resta: pre fine-tuned on harmful compliance data (model or LoRA "
        "adapter).")] = None,
) -> None:
    """Merge pre- and post-tuning weights into a new model (mergekit methods and semantics)."""
    try:
        if config is not None:
            given = [flag for flag, v in (("--pre", pre), ("--post", post), ("--weight", weight),
                                          ("--param", param), ("--anchor", anchor),
                                          ("--unaligned", unaligned),
                                          ("--safety-adapter", safety_adapter),
                                          ("--harmful", harmful))
                     if v]
            if method != "linear":
                given.append("--method")
            if tokenizer_from != "post":
                given.append("--tokenizer-from")
            if out_format != "full":
                given.append("--out-format")
            if given:
                raise UserError(f"--config cannot be combined with {', '.join(given)} (the config "
                                "says which models and parameters to use)")
            from mergesafe.merge.api import merge_config

            _tune_process()
            result = merge_config(config, out, seed=seed, dtype=dtype, shard_size=shard_size,
                                  overwrite=overwrite, allow_pickle=allow_pickle,
                                  progress=not quiet, allow_nonfinite=allow_nonfinite)
        else:
            if pre is None or not post:
                raise UserError("give --pre and --post (or --config)")
            params = _parse_params(param)
            if method == "slerp" and weight and "t" in params:
                raise UserError("slerp: give either --weight or --param t, not both")
            if method == "model_stock" and weight:
                warnings.warn("model_stock has no weights; --weight is ignored")
            if method in RESTORE_METHODS and weight:
                raise UserError(f"{method} has no --weight (its parameters are given with --param)")
            from mergesafe.api import merge

            _tune_process()
            result = merge(pre, list(post), out, method=method,
                           weight=list(weight) if weight else 0.5, params=params, seed=seed,
                           anchor=anchor, dtype=dtype, shard_size=shard_size,
                           tokenizer_from=tokenizer_from, out_format=out_format,
                           overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet,
                           unaligned=unaligned, safety_adapter=safety_adapter, harmful=harmful,
                           allow_nonfinite=allow_nonfinite)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", None)
        print(f"mergesafe: error: {out}: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(128 + signum if signum else 130) from None
    print(f"merged -> {result}")
    _fast_exit_if_console()


def _tune_process() -> None:
    """In the ``mergesafe`` program (only), let glibc reuse freed tensor memory (see
    :func:`mergesafe.stream.tune_malloc`)."""
    if _is_console():
        from mergesafe.stream import tune_malloc

        tune_malloc()


def _is_console() -> bool:
    """Whether this process is the ``mergesafe`` program (not a test or a notebook calling in)."""
    main_mod = sys.modules.get("__main__")
    main_file = Path(getattr(main_mod, "__file__", "") or "")
    return main_file.name == "mergesafe" or (
        main_file.name == "__main__.py" and main_file.parent.name == "mergesafe")


def _fast_exit_if_console() -> None:
    """When running as the ``mergesafe`` program, end the process now: the work is done and
    written, and tearing down torch's interpreter state costs about a second.  Never when called
    in-process (tests, notebooks); ``MERGESAFE_NO_FAST_EXIT=1`` turns it off."""
    if not _is_console() or os.environ.get("MERGESAFE_NO_FAST_EXIT"):
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
