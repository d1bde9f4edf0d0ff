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
    is_adapter_dir,
    open_adapter,
    open_checkpoint,
    parse_size,
    save_file,
    write_manifest,
)
from mergesafe.errors import UserError
from mergesafe.merge.engine import merge_pair, pair_plan
from mergesafe.merge.stream import (
    Source,
    StreamPlan,
    _hash_records,
    execute,
    parse_dtype,
    tokenizer_folder,
)

DEFAULT_SHARD_SIZE = "5GB"
PathLike = str | Path


def _open_post(path: PathLike, pre, allow_pickle: bool):
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError("no such file or folder", p)
    if is_adapter_dir(p):
        return open_adapter(p, pre, allow_pickle=allow_pickle)
    return open_checkpoint(p, allow_pickle=allow_pickle)


def _check_not_input(out: Path, inputs: list[Path]) -> None:
    o = out.expanduser().absolute()
    for p in inputs:
        p = Path(p).expanduser().absolute()
        if o == p or p.is_relative_to(o):
            raise UserError("the output folder must not be (or contain) an input", o)


def merge(pre: PathLike, post: PathLike | Sequence[PathLike], out: PathLike, method: str = "linear",
          weight: float | Sequence[float] = 0.5, params: dict | None = None, seed: int = 0,
          anchor: PathLike | None = None, dtype: str | torch.dtype | None = None,
          shard_size: str | int = DEFAULT_SHARD_SIZE, tokenizer_from: str = "post",
          out_format: str = "full", overwrite: bool = False, allow_pickle: bool = False,
          *, progress: bool = False, unaligned: PathLike | None = None,
          safety_adapter: PathLike | None = None, harmful: PathLike | None = None) -> Path:
    """Merge ``pre`` with one or more ``post`` models into ``out`` and return ``out``.

    ``weight`` (λ) is the weight of the post model (a list: one per post); ``params`` holds method
    parameters (``density``, ``epsilon``, ``gamma``, ``normalize``, ``rescale``, ``t``, ...).
    A post may be a PEFT LoRA adapter folder of ``pre``.  ``anchor`` is model_stock's base.
    ``dtype`` is the output dtype (default: pre's).  ``out_format="adapter"`` writes a PEFT
    adapter with delta λ·ΔW (LoRA post, linear/task_arithmetic only).  Bad input raises
    :class:`~mergesafe.errors.UserError`; nothing is left at ``out`` on failure.

    Safety-restoration methods (``safe_lora``, ``safemerge``, ``resta``; see
    :func:`mergesafe.restore.apply.restore_merge`) take one post, no ``weight``, and their extra
    inputs ``unaligned``, ``safety_adapter`` or ``harmful``.
    """
    from mergesafe.restore.params import RESTORE_METHODS

    if method in RESTORE_METHODS:
        return _restore(pre, post, out, method, params, seed=seed, dtype=dtype,
                        shard_size=shard_size, tokenizer_from=tokenizer_from, out_format=out_format,
                        anchor=anchor, overwrite=overwrite, allow_pickle=allow_pickle,
                        progress=progress, unaligned=unaligned, safety_adapter=safety_adapter,
                        harmful=harmful)
    for flag, value in (("unaligned", unaligned), ("safety_adapter", safety_adapter),
                        ("harmful", harmful)):
        if value is not None:
            raise UserError(f"--{flag.replace('_', '-')} is only used by the safety-restoration "
                            f"methods ({', '.join(RESTORE_METHODS)}), not {method}")
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
    out = Path(out).expanduser()
    _check_not_input(out, [Path(pre), *map(Path, posts), *([Path(anchor)] if anchor else [])])
    out = check_output_dir(out, overwrite)

    pre_ck = open_checkpoint(pre, allow_pickle=allow_pickle)
    pre_src = Source("pre", pre_ck, "pre")
    labels = ["post"] if len(posts) == 1 else [f"post {i + 1}" for i in range(len(posts))]
    post_srcs = [Source(lab, _open_post(p, pre_ck, allow_pickle), "post")
                 for lab, p in zip(labels, posts)]
    anchor_src = (Source("anchor", open_checkpoint(anchor, allow_pickle=allow_pickle), "anchor")
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
        elementwise=plan.spec.kind == "linear" or plan.spec.name == "task_arithmetic")
    return execute(stream_plan, out, overwrite=overwrite, shard_size=size, progress=progress)


def _restore(pre: PathLike, post: PathLike | Sequence[PathLike], out: PathLike, method: str,
             params: dict | None, *, out_format: str, anchor: PathLike | None, **kwargs) -> Path:
    """``merge`` for the safety-restoration methods: one post, no anchor, a full model out."""
    from mergesafe.restore.apply import restore_merge

    posts = [post] if isinstance(post, (str, Path)) else list(post)
    if len(posts) != 1:
        raise UserError(f"{method} takes exactly one --post, got {len(posts)}")
    if anchor is not None:
        raise UserError(f"--anchor is only used by model_stock, not {method}")
    if out_format != "full":
        raise UserError(f"--out-format {out_format} is not available for {method} (only 'full')")
    return restore_merge(pre, posts[0], out, method, params, **kwargs)


def merge_config(config: PathLike, out: PathLike, *, seed: int = 0, dtype: str | None = None,
                 shard_size: str | int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 allow_pickle: bool = False, progress: bool = False) -> Path:
    """Run a mergekit YAML configuration (see :mod:`mergesafe.merge.config`) into ``out``."""
    from mergesafe.merge.config import build_config_plan

    size = parse_size(shard_size)
    out = Path(out).expanduser()
    check_output_dir(out, overwrite)
    plan = build_config_plan(config, seed=seed, allow_pickle=allow_pickle, dtype=dtype)
    _check_not_input(out, [s.dir for s in plan.sources])
    return execute(plan, out, overwrite=overwrite, shard_size=size, progress=progress)


# ---------------------------------------------------------------------------------------------
# LoRA shortcut: write an adapter whose delta is λ·ΔW
# ---------------------------------------------------------------------------------------------

def _merge_as_adapter(plan, pre_src: Source, post_srcs: list[Source], anchor_src, out: Path,
                      manifest: dict, *, seed: int, overwrite: bool, out_dtype,
                      tokenizer_src) -> Path:
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
                tensors[key] = t
            save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            cfg = dict(view.adapter_config)
            cfg["base_model_name_or_path"] = str(Path(pre_src.dir).absolute())
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            if tokenizer_src is not None:
                copy_tokenizer_files(tokenizer_src, tmp)
            hashes = hasher.result()
            m = dict(manifest)
            inputs = _hash_records(m.pop("inputs"), None, hashes)
            write_manifest(tmp, kind="merge", inputs=inputs,
                           timings={"total_s": time.perf_counter() - t0},
                           output={"format": "peft-lora-adapter", "delta_factor": factor,
                                   "files": ["adapter_model.safetensors", "adapter_config.json"]},
                           **m)
    except BaseException:
        hasher.cancel()
        raise
    return out
