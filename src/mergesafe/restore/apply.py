"""Merge-time safety restoration on whole checkpoints, streamed tensor by tensor.

``restore_merge(pre, post, out, method, ...)`` runs Safe LoRA, SafeMERGE or RESTA (the kernels
of :mod:`mergesafe.restore`) through the merge engine's streaming machinery
(:func:`mergesafe.merge.stream.execute`: lazy readers, :class:`StreamingShardWriter`, an atomic
output folder, a ``mergesafe.json`` manifest).  ``mergesafe.merge(..., method="safe_lora")``
and ``mergesafe merge --method safe_lora`` call it.

What a *layer* is (Safe LoRA, SafeMERGE): a floating 2-D weight matrix other than the input
embedding / LM head (``C_i`` would be ``vocab × vocab`` there) whose task update
``ΔW_i = W_i^post − W_i^pre`` is not zero -- for a LoRA post, exactly the LoRA targets, with
``ΔW_i = scale·B_i·A_i`` taken from the adapter.  Every other tensor keeps the post value
``pre + ΔW``.

* **Safe LoRA** (Hsu et al. 2024), two streaming passes: pass 1 computes ``cos_i`` per layer
  (one layer's pre, unaligned and ΔW in memory at a time); :func:`select_layers` picks the
  top-k lowest (or those under a threshold); pass 2 writes ``pre + C_i·ΔW_i`` for the selected
  layers and ``pre + ΔW_i`` for the others.  The manifest records every cosine and the
  selected set.
* **SafeMERGE** (Djuhera et al. 2025), one pass: ``pre + w_task·ΔW_task + w_safe·ΔW_safe`` for
  the layers with ``cos_i < threshold``, ``pre + ΔW_task`` elsewhere; the full updates are
  blended (see :mod:`mergesafe.restore.safemerge`).  A safety update on a tensor the task does
  not change is not used.  Manifest: cosines and the blended set.
* **RESTA** (Bhardwaj et al. 2024), one pass over every floating tensor:
  ``pre + DARE(post − pre) + γ·(pre − harmful)``, DARE seeded per tensor from ``seed``.

Inputs that are only needed for some tensors (the unaligned model, the safety adapter) are read
on demand, only for those tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergesafe.checkpoint import (AdapterView, check_output_dir, is_adapter_dir, open_checkpoint,
                                  parse_size)
from mergesafe.errors import UserError
from mergesafe.merge.engine import is_vocab_tensor, tensor_seed
from mergesafe.merge.stream import (Source, StreamPlan, check_architectures, execute, parse_dtype,
                                    plan_outputs, tokenizer_folder)
from mergesafe.restore.params import RESTORE_METHODS, validate_restore_params
from mergesafe.restore.resta import resta as resta_kernel
from mergesafe.restore.safe_lora import (alignment_projector, projection_cosine, safe_lora_update,
                                         select_layers)
from mergesafe.restore.safemerge import safemerge_update

PathLike = str | Path
DEFAULT_SHARD_SIZE = "5GB"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

class OnDemand:
    """A checkpoint (or adapter view) whose floating tensors the streaming loop does not read.

    ``get`` answers an empty placeholder for floating tensors (non-floating ones, which the
    engine compares across inputs, are read); the method reads what it needs with :meth:`read`.
    Everything else (names, shapes, files for hashing, ``base`` of an adapter) is the wrapped
    checkpoint's, so validation and the manifest treat it as a normal input.
    """

    kind = "on-demand"  # not "safetensors": the engine must not read it block by block

    def __init__(self, ckpt: Any) -> None:
        self.inner = ckpt

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if self.inner.dtype(name).is_floating_point:
            return torch.empty(0)
        return self.inner.get(name) if rows is None else self.inner.get(name, rows)

    def read(self, name: str) -> torch.Tensor:
        """The real tensor, as float32."""
        return self.inner.get(name).float()


def _exists(path: PathLike, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"no such file or folder (given as {flag})", p)
    return p


def open_full_model(path: PathLike, flag: str, allow_pickle: bool = False):
    """A full model folder (not an adapter) given as ``flag``."""
    p = _exists(path, flag)
    if is_adapter_dir(p):
        raise UserError(f"{flag} must be a full model folder, not a PEFT adapter", p)
    return open_checkpoint(p, allow_pickle=allow_pickle)


def open_model_or_adapter(path: PathLike, pre_ck, flag: str, allow_pickle: bool = False):
    """A full model, or a PEFT LoRA adapter of pre seen as full weights."""
    from mergesafe.merge.api import _open_post

    _exists(path, flag)
    return _open_post(path, pre_ck, allow_pickle)


def validate_inputs(reference: Source, sources: list[Source], out_dtype: torch.dtype | None,
                    method: str) -> None:
    """Architectures, tensor names and shapes agree (UserError naming the input otherwise);
    vocabulary growth is refused (these methods need equal shapes)."""
    check_architectures(reference, sources)
    _, grown = plan_outputs(reference, sources, out_dtype)
    if grown:
        name, (n, n_out) = next(iter(grown.items()))
        culprit = next(s for s in sources if s.ckpt.shape(name)[0] == n_out)
        raise UserError(f"tensor {name!r}: shape mismatch ({n_out} rows in {culprit.label}, {n} in "
                        f"{reference.label}); {method} needs the same shapes in every input",
                        culprit.dir)


def is_layer_tensor(ckpt: Any, name: str) -> bool:
    """A floating 2-D weight matrix other than an embedding / LM head (a Safe LoRA layer)."""
    return (ckpt.dtype(name).is_floating_point and len(ckpt.shape(name)) == 2
            and not is_vocab_tensor(name))


def _unwrap(ckpt: Any) -> Any:
    return ckpt.inner if isinstance(ckpt, OnDemand) else ckpt


def update_of(ckpt: Any, name: str, pre_t: torch.Tensor,
              post_t: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW = post − pre`` (float32): ``scale·B·A`` straight from a LoRA adapter's factors for
    its targets, else the difference of the two tensors (``post_t`` when already loaded)."""
    ck = _unwrap(ckpt)
    if isinstance(ck, AdapterView) and name in ck.lora_modules:
        return ck.delta(name)
    t = post_t if post_t is not None and post_t.numel() else ck.get(name)
    return t.float() - pre_t


def _might_change(ckpt: Any, name: str) -> bool:
    """False when ``name`` certainly equals pre (an adapter that does not touch it)."""
    ck = _unwrap(ckpt)
    if isinstance(ck, AdapterView):
        return name in ck.lora_modules or name in ck.saved_modules
    return True


def _common_checks(out: PathLike, inputs: list[PathLike | None], tokenizer_from: str) -> Path:
    from mergesafe.merge.api import _check_not_input

    if tokenizer_from not in ("pre", "post"):
        raise UserError(f"tokenizer_from must be 'pre' or 'post', got {tokenizer_from!r}")
    out = Path(out).expanduser()
    _check_not_input(out, [Path(p) for p in inputs if p is not None])
    return out


def _tokenizer_src(tokenizer_from: str, pre_src: Source, post_src: Source) -> Path | None:
    if tokenizer_from == "post":
        return tokenizer_folder(post_src, pre_src)
    return tokenizer_folder(pre_src, post_src)


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------

def restore_merge(pre: PathLike, post: PathLike, out: PathLike, method: str,
                  params: dict | None = None, *, unaligned: PathLike | None = None,
                  safety_adapter: PathLike | None = None, harmful: PathLike | None = None,
                  seed: int = 0, dtype: str | torch.dtype | None = None,
                  shard_size: str | int = DEFAULT_SHARD_SIZE, tokenizer_from: str = "post",
                  overwrite: bool = False, allow_pickle: bool = False,
                  progress: bool = False) -> Path:
    """Run ``method`` (``safe_lora``, ``safemerge`` or ``resta``) on pre/post into ``out``.

    Extra inputs: ``unaligned`` (safe_lora, safemerge: the model before safety alignment),
    ``safety_adapter`` (safemerge: a LoRA adapter -- or full model -- of pre trained on safety
    data), ``harmful`` (resta: pre fine-tuned on harmful compliance data; model or adapter).
    ``params``: see :mod:`mergesafe.restore.params`.  Bad input raises
    :class:`~mergesafe.errors.UserError` before anything is written; nothing is left at ``out``
    on failure.  Returns ``out``.
    """
    if method not in RESTORE_METHODS:
        raise UserError(f"unknown restoration method {method!r}; choose one of: "
                        f"{', '.join(RESTORE_METHODS)}")
    p = validate_restore_params(method, params)
    needs = {"safe_lora": {"unaligned"}, "safemerge": {"unaligned", "safety_adapter"},
             "resta": {"harmful"}}[method]
    given = {"unaligned": unaligned, "safety_adapter": safety_adapter, "harmful": harmful}
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if key in needs and value is None:
            raise UserError(f"method {method} needs {flag} PATH")
        if key not in needs and value is not None:
            users = [m for m, n in (("safe_lora", "unaligned"), ("safemerge", "unaligned"),
                                    ("safemerge", "safety_adapter"), ("resta", "harmful"))
                     if n == key]
            raise UserError(f"{flag} is not used by {method} (only by {' and '.join(users)})")
    out_dtype = parse_dtype(dtype)
    size = parse_size(shard_size)
    out = _common_checks(out, [pre, post, unaligned, safety_adapter, harmful], tokenizer_from)
    check_output_dir(out, overwrite)

    pre_ck = open_checkpoint(_exists(pre, "--pre"), allow_pickle=allow_pickle)
    pre_src = Source("pre", pre_ck, "pre")
    post_src = Source("post", open_model_or_adapter(post, pre_ck, "--post", allow_pickle), "post")
    common = dict(out=out, out_dtype=out_dtype, size=size, tokenizer_from=tokenizer_from,
                  overwrite=overwrite, progress=progress)
    if method == "safe_lora":
        u_src = Source("unaligned", OnDemand(open_full_model(unaligned, "--unaligned", allow_pickle)),
                       "unaligned")
        return _safe_lora(pre_src, post_src, u_src, p, **common)
    if method == "safemerge":
        u_src = Source("unaligned", OnDemand(open_full_model(unaligned, "--unaligned", allow_pickle)),
                       "unaligned")
        s_src = Source("safety", OnDemand(open_model_or_adapter(safety_adapter, pre_ck,
                                                                "--safety-adapter", allow_pickle)),
                       "safety")
        return _safemerge(pre_src, post_src, u_src, s_src, p, **common)
    h_src = Source("harmful", open_model_or_adapter(harmful, pre_ck, "--harmful", allow_pickle),
                   "harmful")
    return _resta(pre_src, post_src, h_src, p, seed=seed, **common)


def _execute(kind: str, pre_src: Source, post_src: Source, sources: list[Source], compute,
             manifest: dict, *, out: Path, out_dtype, size: int, tokenizer_from: str,
             overwrite: bool, progress: bool, elementwise: bool = False) -> Path:
    tok = _tokenizer_src(tokenizer_from, pre_src, post_src)
    primary = post_src if tokenizer_from == "post" else pre_src
    plan = StreamPlan(kind=kind, reference=pre_src, sources=sources, compute=compute,
                      out_dtype=out_dtype, tokenizer_src=tok,
                      generation_src=[primary.dir, pre_src.dir], manifest=manifest,
                      elementwise=elementwise)
    return execute(plan, out, overwrite=overwrite, shard_size=size, progress=progress)


# ---------------------------------------------------------------------------------------------
# Safe LoRA: two passes
# ---------------------------------------------------------------------------------------------

def safe_lora_cosines(pre_ck: Any, post_ck: Any, u_ck: OnDemand) -> dict[str, float]:
    """Pass 1: ``cos_i`` for every layer with a non-zero update, one layer in memory at a time."""
    cosines: dict[str, float] = {}
    for name in pre_ck.names():
        if not is_layer_tensor(pre_ck, name) or not _might_change(post_ck, name):
            continue
        pre_t = pre_ck.get(name).float()
        delta = update_of(post_ck, name, pre_t)
        if not torch.any(delta):
            continue
        C = alignment_projector(pre_t, u_ck.read(name))
        cosines[name] = projection_cosine(C, delta)
        del C, delta, pre_t
    return cosines


def _safe_lora(pre_src: Source, post_src: Source, u_src: Source, p: dict, **common) -> Path:
    sources = [pre_src, post_src, u_src]
    validate_inputs(pre_src, sources, common["out_dtype"], "safe_lora")
    cosines = safe_lora_cosines(pre_src.ckpt, post_src.ckpt, u_src.ckpt)
    try:
        selected = select_layers(cosines, top_k=p["top_k"], threshold=p["threshold"])
    except ValueError as err:
        raise UserError(f"safe_lora: {err}") from None
    u_ck: OnDemand = u_src.ckpt

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in selected:
            return loaded["post"]  # pre + ΔW
        pre_t = loaded["pre"]
        delta = update_of(post_src.ckpt, name, pre_t, loaded["post"])
        C = alignment_projector(pre_t, u_ck.read(name))
        return pre_t + safe_lora_update(delta, C, project=True)

    selection = ({"threshold": p["threshold"]} if p["threshold"] is not None
                 else {"top_k": p["top_k"]})
    manifest = {
        "method": "safe_lora", "params": p,
        "reference": "Hsu et al. 2024, Safe LoRA (NeurIPS 2024)",
        "inputs": {"pre": pre_src, "post": post_src, "unaligned": u_src},
        "safe_lora": {"selection": selection, "cosines": cosines,
                      "selected": sorted(selected), "layers": len(cosines)},
    }
    return _execute("merge", pre_src, post_src, sources, compute, manifest, **common)


# ---------------------------------------------------------------------------------------------
# SafeMERGE: one pass
# ---------------------------------------------------------------------------------------------

def _safemerge(pre_src: Source, post_src: Source, u_src: Source, s_src: Source, p: dict,
               **common) -> Path:
    sources = [pre_src, post_src, u_src, s_src]
    validate_inputs(pre_src, sources, common["out_dtype"], "safemerge")
    u_ck: OnDemand = u_src.ckpt
    s_ck: OnDemand = s_src.ckpt
    cosines: dict[str, float] = {}
    merged: list[str] = []

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        post_t = loaded["post"]
        if not is_layer_tensor(pre_src.ckpt, name) or not _might_change(post_src.ckpt, name):
            return post_t
        pre_t = loaded["pre"]
        delta = update_of(post_src.ckpt, name, pre_t, post_t)
        if not torch.any(delta):
            return post_t
        C = alignment_projector(pre_t, u_ck.read(name))
        cos = projection_cosine(C, delta)
        del C
        cosines[name] = cos
        if not cos < p["threshold"]:
            return post_t  # pre + ΔW_task
        merged.append(name)
        d_safe = (update_of(s_ck, name, pre_t) if _might_change(s_ck, name)
                  else torch.zeros_like(delta))
        return pre_t + safemerge_update(delta, d_safe, cos, p["threshold"], p["task_weight"],
                                        p["safety_weight"])

    manifest = {
        "method": "safemerge", "params": p,
        "reference": "Djuhera et al. 2025, SafeMERGE",
        "merge_of": "full updates w_task·ΔW_task + w_safe·ΔW_safe (not PEFT's A/B averaging)",
        "inputs": {"pre": pre_src, "post": post_src, "unaligned": u_src, "safety_adapter": s_src},
        # filled while streaming (the manifest is written after the last tensor)
        "safemerge": {"cosines": cosines, "merged": merged},
    }
    return _execute("merge", pre_src, post_src, sources, compute, manifest, **common)


# ---------------------------------------------------------------------------------------------
# RESTA: one pass
# ---------------------------------------------------------------------------------------------

def _resta(pre_src: Source, post_src: Source, h_src: Source, p: dict, *, seed: int,
           **common) -> Path:
    sources = [pre_src, post_src, h_src]
    validate_inputs(pre_src, sources, common["out_dtype"], "resta")
    density = p["density"]

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        gen = None
        if density is not None and density < 1.0:
            gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        return resta_kernel(loaded["pre"], loaded["post"], loaded["harmful"], gamma=p["gamma"],
                            dare_density=density, generator=gen)

    manifest = {
        "method": "resta", "params": p, "seed": seed,
        "reference": "Bhardwaj et al. 2024, RESTA (ACL 2024)",
        "inputs": {"pre": pre_src, "post": post_src, "harmful": h_src},
    }
    # without DARE the formula is elementwise: big tensors may stream in row blocks
    return _execute("merge", pre_src, post_src, sources, compute, manifest,
                    elementwise=density is None or density >= 1.0, **common)
