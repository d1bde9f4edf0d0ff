"""Python API: ``mergesafe.merge(pre, post, out, ...)`` and ``merge_config(config, out, ...)``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from mergesafe.checkpoint import (
    AdapterView,
    BackgroundHasher,
    atomic_output_dir,
    check_output_dir,
    copy_tokenizer_files,
    parse_size,
    save_file,
    write_manifest,
)
from mergesafe.checkpoint.inputs import check_not_input, open_model, open_model_or_adapter
from mergesafe.errors import UserError
from mergesafe.merge.engine import merge_pair, pair_plan
from mergesafe.stream import (Source, StreamPlan, check_finite, execute, hash_records, parse_dtype,
                              tokenizer_folder)

DEFAULT_SHARD_SIZE = "5GB"
PathLike = str | Path


def merge(pre: PathLike, post: PathLike | Sequence[PathLike], out: PathLike, method: str = "linear",
          weight: float | Sequence[float] = 0.5, params: dict | None = None, seed: int = 0,
          anchor: PathLike | None = None, dtype: str | torch.dtype | None = None,
          shard_size: str | int = DEFAULT_SHARD_SIZE, tokenizer_from: str = "post",
          out_format: str = "full", overwrite: bool = False, allow_pickle: bool = False,
          *, progress: bool = False, allow_nonfinite: bool = False) -> Path:
    """Merge ``pre`` with one or more ``post`` models into ``out`` and return ``out``.

    ``weight`` (λ) is the weight of the post model (a list: one per post); ``params`` holds method
    parameters (``density``, ``epsilon``, ``gamma``, ``normalize``, ``rescale``, ``t``, ...).
    A post may be a PEFT LoRA adapter folder of ``pre``.  ``anchor`` is model_stock's base.
    ``dtype`` is the output dtype (default: pre's).  ``out_format="adapter"`` writes a PEFT
    adapter with delta λ·ΔW (LoRA post, linear/task_arithmetic only).  A merged tensor with
    inf/NaN is an error unless ``allow_nonfinite``.  Bad input raises
    :class:`~mergesafe.errors.UserError`; nothing is left at ``out`` on failure.

    The safety-restoration methods (``safe_lora``, ``safemerge``, ``resta``) are
    :func:`mergesafe.restore.apply.restore_merge`; ``mergesafe.merge(...)`` (the package, see
    :mod:`mergesafe.api`) dispatches to either.
    """
    posts = [post] if isinstance(post, (str, Path)) else list(post)
    if not posts:
        raise UserError("at least one post model is needed")
    weights = [weight] if isinstance(weight, (int, float)) else list(weight)
    if tokenizer_from not in ("pre", "post"):
        raise UserError(f"tokenizer_from must be 'pre' or 'post', got {tokenizer_from!r}")
    if out_format not in ("full", "adapter"):
        raise UserError(f"out_format must be 'full' or 'adapter', got {out_format!r}")
    plan = pair_plan(method, params, weights, len(posts), anchor is not None)
    out_dtype = parse_dtype(dtype)
    size = parse_size(shard_size)
    check_not_input(out, [pre, *posts, anchor])
    out = check_output_dir(out, overwrite)

    pre_ck = open_model(pre, "--pre", allow_pickle)
    pre_src = Source("pre", pre_ck, "pre")
    labels = ["post"] if len(posts) == 1 else [f"post {i + 1}" for i in range(len(posts))]
    post_srcs = [Source(lab, open_model_or_adapter(p, pre_ck, "--post", allow_pickle), "post")
                 for lab, p in zip(labels, posts)]
    anchor_src = (Source("anchor", open_model(anchor, "--anchor", allow_pickle), "anchor")
                  if anchor is not None else None)
    tok_primary = post_srcs[0] if tokenizer_from == "post" else pre_src
    manifest = {
        "method": method,
        "params": {"weights": [float(w) for w in (weights if len(weights) == len(posts)
                                                  else weights * len(posts))],
                   **(params or {})},
        "resolved": plan.mergekit_equivalent(),
        "seed": seed,
        "tokenizer_from": tokenizer_from,
        "out_format": out_format,
        "inputs": {"pre": pre_src, "post": post_srcs if len(post_srcs) > 1 else post_srcs[0],
                   **({"anchor": anchor_src} if anchor_src else {})},
    }
    if out_format == "adapter":
        return _merge_as_adapter(plan, pre_src, post_srcs, anchor_src, out, manifest, seed=seed,
                                 overwrite=overwrite, out_dtype=out_dtype,
                                 allow_nonfinite=allow_nonfinite,
                                 tokenizer_src=tokenizer_folder(tok_primary, pre_src))

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        return merge_pair(plan, name, loaded["pre"], [loaded[lab] for lab in labels], seed,
                          loaded.get("anchor"), consume=True)  # loaded tensors are ours

    sources = [pre_src, *post_srcs] + ([anchor_src] if anchor_src else [])
    stream_plan = StreamPlan(
        kind="merge", reference=pre_src, sources=sources, compute=compute, out_dtype=out_dtype,
        tokenizer_src=tokenizer_folder(tok_primary, pre_src if tokenizer_from == "post" else
                                       post_srcs[0]),
        generation_src=[tok_primary.dir, pre_src.dir], manifest=manifest,
        elementwise=plan.spec.kind == "linear" or plan.spec.name == "task_arithmetic",
        allow_nonfinite=allow_nonfinite)
    return execute(stream_plan, out, overwrite=overwrite, shard_size=size, progress=progress)


def merge_config(config: PathLike, out: PathLike, *, seed: int = 0, dtype: str | None = None,
                 shard_size: str | int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 allow_pickle: bool = False, progress: bool = False,
                 allow_nonfinite: bool = False) -> Path:
    """Run a mergekit YAML configuration (see :mod:`mergesafe.merge.config`) into ``out``."""
    from mergesafe.merge.config import build_config_plan

    size = parse_size(shard_size)
    check_not_input(out, [config])
    check_output_dir(out, overwrite)
    plan = build_config_plan(config, seed=seed, allow_pickle=allow_pickle, dtype=dtype)
    check_not_input(out, [s.dir for s in plan.sources])
    plan.allow_nonfinite = allow_nonfinite
    return execute(plan, out, overwrite=overwrite, shard_size=size, progress=progress)


# ---------------------------------------------------------------------------------------------
# LoRA shortcut: write an adapter whose delta is λ·ΔW
# ---------------------------------------------------------------------------------------------

def _merge_as_adapter(plan, pre_src: Source, post_srcs: list[Source], anchor_src, out: Path,
                      manifest: dict, *, seed: int, overwrite: bool, out_dtype,
                      tokenizer_src, allow_nonfinite: bool = False) -> Path:
    t0 = time.perf_counter()
    spec = plan.spec
    if (len(post_srcs) != 1 or not isinstance(post_srcs[0].ckpt, AdapterView)
            or spec.name not in ("linear", "task_arithmetic") or anchor_src is not None):
        raise UserError("--out-format adapter needs exactly one post that is a LoRA adapter of pre "
                        "and method linear or task_arithmetic")
    view: AdapterView = post_srcs[0].ckpt
    w = plan.weights[-1]
    if spec.name == "linear":
        # ((1 − w)·W + w·(W + ΔW)) / Σweights  =  W + w/Σweights · ΔW
        denom = float(torch.tensor(plan.weights, dtype=torch.float32).sum())
        factor = w / denom if plan.shared["normalize"] and denom != 0 else w
    else:
        # pre + λ_eff·w·ΔW whatever normalize says (see engine.pair_plan)
        sh = plan.shared
        if sh["normalize"]:
            factor = sh["lambda"] if sh["normalize_by"] == "weight" else w * sh["lambda"]
        else:
            factor = w * sh["lambda"]
    hasher = BackgroundHasher([f for s in (pre_src, *post_srcs) for f in s.ckpt.files()])
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            tensors: dict[str, torch.Tensor] = {}
            b_keys = {lm.b_key for lm in view.lora_modules.values()}
            for key in view.raw_keys():
                t = view.raw(key)
                dt = out_dtype or t.dtype
                if key in b_keys:
                    t = (t.float() * factor).to(dt)
                elif key in view.saved_modules.values():
                    name = next(n for n, k in view.saved_modules.items() if k == key)
                    merged = merge_pair(plan, name, pre_src.ckpt.get(name).float(),
                                        [view.get(name).float()], seed)
                    t = merged.to(dt)
                else:
                    t = t.to(dt)
                if not allow_nonfinite and t.is_floating_point():
                    check_finite(key, t)
                tensors[key] = t
            save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            cfg = dict(view.adapter_config)
            cfg["base_model_name_or_path"] = str(Path(pre_src.dir).absolute())
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            if tokenizer_src is not None:
                copy_tokenizer_files(tokenizer_src, tmp)
            hashes = hasher.result()
            m = dict(manifest)
            inputs = hash_records(m.pop("inputs"), None, hashes)
            write_manifest(tmp, kind="merge", inputs=inputs,
                           timings={"total_s": time.perf_counter() - t0},
                           output={"format": "peft-lora-adapter", "delta_factor": factor,
                                   "files": ["adapter_model.safetensors", "adapter_config.json"]},
                           **m)
    except BaseException:
        hasher.cancel()
        raise
    return out
