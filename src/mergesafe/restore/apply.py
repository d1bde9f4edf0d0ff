"""Merge-time safety restoration on whole checkpoints, streamed tensor by tensor.

``restore_merge(pre, post, out, method, ...)`` runs Safe LoRA, SafeMERGE or RESTA (the kernels
of :mod:`mergesafe.restore`) through the merge engine's streaming machinery
(:func:`mergesafe.stream.execute`: lazy readers, :class:`StreamingShardWriter`, an atomic
output folder, a ``mergesafe.json`` manifest).  ``mergesafe.merge(..., method="safe_lora")``
and ``mergesafe merge --method safe_lora`` call it.

What a *layer* is (Safe LoRA, SafeMERGE): a floating 2-D weight matrix other than the input
embedding / LM head (``C_i`` would be ``vocab × vocab`` there) whose task update
``ΔW_i = W_i^post − W_i^pre`` is not zero -- for a LoRA post, exactly the LoRA targets, with
``ΔW_i = scale·B_i·A_i`` taken from the adapter.  Every other tensor keeps the post value
``pre + ΔW``.

* **Safe LoRA** (Hsu et al. 2024), two streaming passes: pass 1 computes ``cos_i`` per layer
  (one layer's pre, unaligned and ΔW in memory at a time); :func:`select_layers` picks the
  top-k lowest (or those at or under a threshold, cosines rounded to 5 decimals, as the IBM
  reference does; a layer whose alignment matrix is zero is never projected); pass 2 writes
  ``pre + C_i·ΔW_i`` (computed as ``V(VᵀΔW)/‖V‖_F``, never forming ``C``) for the selected
  layers and ``pre + ΔW_i`` for the others.  The manifest records every cosine and the
  selected set.
* **SafeMERGE** (Djuhera et al. 2025), one pass: ``pre + w_task·ΔW_task + w_safe·ΔW_safe`` for
  the layers with ``round(cos_i, 5) < threshold``, ``pre + ΔW_task`` elsewhere; the full updates are
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

from mergesafe.checkpoint import AdapterView, check_output_dir, parse_size
from mergesafe.checkpoint.inputs import check_not_input, open_model, open_model_or_adapter
from mergesafe.checkpoint.vocab import is_vocab_tensor
from mergesafe.errors import UserError
from mergesafe.merge.engine import tensor_seed
from mergesafe.stream import (Source, StreamPlan, check_architectures, execute, parse_dtype,
                              plan_outputs, tokenizer_folder)
from mergesafe.restore.params import RESTORE_METHODS, validate_restore_params
from mergesafe.restore.resta import resta as resta_kernel
from mergesafe.restore.safe_lora import (COSINE_DECIMALS, alignment_matrix, lora_update_cosine,
                                         project_lora_update, project_update, select_layers,
                                         update_cosine)
from mergesafe.restore.safemerge import blends, safemerge_update

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
                  progress: bool = False, allow_nonfinite: bool = False) -> Path:
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
    if tokenizer_from not in ("pre", "post"):
        raise UserError(f"tokenizer_from must be 'pre' or 'post', got {tokenizer_from!r}")
    out_dtype = parse_dtype(dtype)
    size = parse_size(shard_size)
    check_not_input(out, [pre, post, unaligned, safety_adapter, harmful])
    out = check_output_dir(out, overwrite)

    pre_ck = open_model(pre, "--pre", allow_pickle)
    pre_src = Source("pre", pre_ck, "pre")
    post_src = Source("post", open_model_or_adapter(post, pre_ck, "--post", allow_pickle), "post")
    common = dict(out=out, out_dtype=out_dtype, size=size, tokenizer_from=tokenizer_from,
                  overwrite=overwrite, progress=progress, allow_nonfinite=allow_nonfinite)
    if method == "safe_lora":
        u_src = Source("unaligned", OnDemand(open_model(unaligned, "--unaligned", allow_pickle)),
                       "unaligned")
        return _safe_lora(pre_src, post_src, u_src, p, **common)
    if method == "safemerge":
        u_src = Source("unaligned", OnDemand(open_model(unaligned, "--unaligned", allow_pickle)),
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
             overwrite: bool, progress: bool, allow_nonfinite: bool,
             elementwise: bool = False) -> Path:
    tok = _tokenizer_src(tokenizer_from, pre_src, post_src)
    primary = post_src if tokenizer_from == "post" else pre_src
    plan = StreamPlan(kind=kind, reference=pre_src, sources=sources, compute=compute,
                      out_dtype=out_dtype, tokenizer_src=tok,
                      generation_src=[primary.dir, pre_src.dir], manifest=manifest,
                      elementwise=elementwise, allow_nonfinite=allow_nonfinite)
    return execute(plan, out, overwrite=overwrite, shard_size=size, progress=progress)


# ---------------------------------------------------------------------------------------------
# Safe LoRA: two passes
# ---------------------------------------------------------------------------------------------

def _lora_factors(ckpt: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(B, A, scale)`` with ``ΔW = scale·B·A`` (float32) for a LoRA target of an adapter, else
    ``None``.  For ``fan_in_fan_out`` / embedding LoRA (``ΔW = scale·(B·A)ᵀ``) the factors are
    returned as ``(Aᵀ, Bᵀ)``, so that ``ΔW = scale·B'·A'`` as :meth:`AdapterView.delta` gives."""
    ck = _unwrap(ckpt)
    lm = getattr(ck, "lora_modules", {}).get(name)
    if lm is None:
        return None
    a, b = ck.raw(lm.a_key).float(), ck.raw(lm.b_key).float()
    return (a.T, b.T, lm.scale) if lm.transpose else (b, a, lm.scale)


_NOT_A_LAYER = object()


def _layer_cosine(post_ck: Any, u_ck: OnDemand, name: str, pre_t: torch.Tensor,
                  post_t: torch.Tensor | None = None) -> Any:
    """Safe LoRA's ``cos_i`` of one layer (``None``: zero alignment matrix ``V``), computed
    without forming ``C`` -- for a LoRA post from the factors, without forming ``ΔW`` either;
    ``_NOT_A_LAYER`` when the update is zero."""
    factors = _lora_factors(post_ck, name)
    if factors is not None:
        b, a, scale = factors
        if scale == 0 or not torch.any(b) or not torch.any(a):
            return _NOT_A_LAYER
        return lora_update_cosine(alignment_matrix(pre_t, u_ck.read(name)), b, a)
    delta = update_of(post_ck, name, pre_t, post_t)
    if not torch.any(delta):
        return _NOT_A_LAYER
    return update_cosine(alignment_matrix(pre_t, u_ck.read(name)), delta)


def safe_lora_cosines(pre_ck: Any, post_ck: Any, u_ck: OnDemand) -> dict[str, float | None]:
    """Pass 1: ``cos_i`` for every layer with a non-zero update, one layer in memory at a time;
    ``None`` for a layer whose alignment matrix ``V_i`` is zero (never selected)."""
    cosines: dict[str, float | None] = {}
    for name in pre_ck.names():
        if not is_layer_tensor(pre_ck, name) or not _might_change(post_ck, name):
            continue
        cos = _layer_cosine(post_ck, u_ck, name, pre_ck.get(name).float())
        if cos is not _NOT_A_LAYER:
            cosines[name] = cos
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
        v = alignment_matrix(pre_t, u_ck.read(name))  # non-zero: a zero V is never selected
        factors = _lora_factors(post_src.ckpt, name)
        if factors is not None:
            return pre_t + project_lora_update(v, *factors)  # C·(scale·B·A), from the factors
        return pre_t + project_update(v, update_of(post_src.ckpt, name, pre_t, loaded["post"]))

    selection = ({"threshold": p["threshold"]} if p["threshold"] is not None
                 else {"top_k": p["top_k"]})
    manifest = {
        "method": "safe_lora", "params": p,
        "reference": "Hsu et al. 2024, Safe LoRA (NeurIPS 2024); code: github.com/IBM/SafeLoRA",
        "inputs": {"pre": pre_src, "post": post_src, "unaligned": u_src},
        "safe_lora": {"selection": selection, "cosines": cosines,
                      "selected_on": f"cosines rounded to {COSINE_DECIMALS} decimals"
                                     + (", cos <= threshold" if p["threshold"] is not None
                                        else ", the lowest (ties: by name)"),
                      "selected": sorted(selected), "layers": len(cosines),
                      # V = W_pre − W_unaligned is zero: no C, cosine null, never projected
                      "zero_alignment": sorted(n for n, c in cosines.items() if c is None)},
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
    cosines: dict[str, float | None] = {}
    merged: list[str] = []
    zero_alignment: list[str] = []

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        post_t = loaded["post"]
        if not is_layer_tensor(pre_src.ckpt, name) or not _might_change(post_src.ckpt, name):
            return post_t
        pre_t = loaded["pre"]
        cos = _layer_cosine(post_src.ckpt, u_ck, name, pre_t, post_t)  # Safe LoRA's, no C formed
        if cos is _NOT_A_LAYER:
            return post_t
        cosines[name] = cos
        if cos is None:
            zero_alignment.append(name)
        if not blends(cos, p["threshold"]):
            return post_t  # pre + ΔW_task
        merged.append(name)
        delta = update_of(post_src.ckpt, name, pre_t, post_t)
        d_safe = (update_of(s_ck, name, pre_t) if _might_change(s_ck, name)
                  else torch.zeros_like(delta))
        return pre_t + safemerge_update(delta, d_safe, cos, p["threshold"], p["task_weight"],
                                        p["safety_weight"])

    manifest = {
        "method": "safemerge", "params": p,
        "reference": "Djuhera et al. 2025, SafeMERGE; code: github.com/aladinD/SafeMERGE",
        "merge_of": "full updates w_task·ΔW_task + w_safe·ΔW_safe (not PEFT's A/B averaging)",
        "inputs": {"pre": pre_src, "post": post_src, "unaligned": u_src, "safety_adapter": s_src},
        # filled while streaming (the manifest is written after the last tensor)
        "safemerge": {"cosines": cosines, "merged": merged,
                      "merged_on": "cosines rounded to 5 decimals, cos < threshold; a zero V "
                                   "(cosine null) is merged, as SafeMERGE's code (C = 0) does",
                      "zero_alignment": zero_alignment},
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
