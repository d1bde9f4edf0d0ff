"""``finetune --ema BETA``: an exponential moving average in parameter space (Kim et al. 2025).

During fine-tuning, from the pre weights, after every optimiser step::

    θ̄₀ = θ_pre,    θ̄_t ← β·θ̄_{t−1} + (1 − β)·θ_t          (:func:`mergesafe.restore.ema_update_`)

over the *trained* parameters, kept in float32 on the parameters' device (one extra copy of
them).  The EMA model is written beside the normal output, as ``OUT/ema/``:

* full fine-tuning: a full model folder (config, weights in the checkpoint's dtype, tokenizer);
* LoRA: the EMA of the adapter's trained factors ``A`` and ``B`` (their pre values are peft's
  initialisation, ``B = 0``), written as a PEFT adapter folder.  This is the EMA in the
  parameter space that is trained; its update is ``B̄·Ā``, not the average of the updates
  ``B_t·A_t`` (which is not low-rank);
* LoRA with ``--merge-adapter``: that EMA adapter merged into the base model (full weights in
  ``OUT/ema``, the adapter in ``OUT/ema/adapter``), like the main output.

``OUT/ema/mergesafe.json`` records β and the number of steps.  Checkpoints (``--save-steps``)
hold the EMA in ``checkpoint-N/ema_state.safetensors`` so that ``--resume`` continues it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import TrainerCallback

from mergesafe.errors import UserError
from mergesafe.restore.ema import ema_update_

EMA_DIR = "ema"
EMA_STATE = "ema_state.safetensors"


def trained_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters the optimiser updates (``requires_grad``), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class EmaCallback(TrainerCallback):
    """Keeps ``avg`` = θ̄ over the trained parameters; saves it with each checkpoint."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta <= 1.0:
            raise UserError(f"--ema must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.avg: dict[str, torch.Tensor] | None = None
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = trained_parameters(model)
        if state.global_step > 0:  # resumed: continue the EMA saved with that checkpoint
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / EMA_STATE
            self.avg = load_state(path, params)
        else:
            self.avg = {n: p.detach().float().clone() for n, p in params.items()}
        self.steps = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        ema_update_(self.avg, trained_parameters(model), self.beta)
        self.steps = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.avg is None:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_file({n: t.detach().cpu().contiguous() for n, t in self.avg.items()},
                      str(folder / EMA_STATE),
                      metadata={"beta": repr(self.beta), "step": str(state.global_step)})


def load_state(path: Path, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA saved in a checkpoint, checked against the trained parameters."""
    if not path.is_file():
        raise UserError("this checkpoint has no EMA state (it was trained without --ema); "
                        "resume without --ema or start again", path.parent)
    from safetensors.torch import load_file

    state = load_file(str(path))
    if state.keys() != params.keys():
        raise UserError("the EMA state does not match the trained parameters", path)
    return {n: state[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}


def check_resumable(checkpoint: Path | None) -> None:
    """UserError when resuming an EMA run from a checkpoint without EMA state."""
    if checkpoint is not None and not (checkpoint / EMA_STATE).is_file():
        raise UserError("this checkpoint has no EMA state (it was trained without --ema); "
                        "resume without --ema or start again", checkpoint)


@contextmanager
def ema_weights(model, avg: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the trained parameters hold the EMA; afterwards their own values."""
    params = trained_parameters(model)
    live = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(avg[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n])


def save_with_ema(trainer, tok, cfg, work: Path, saved_dtype: torch.dtype, ema: EmaCallback,
                  model_path: Path) -> str:
    """Save the normal output (``trainer.save_model``'s job) and the EMA model in ``work/ema``.

    Returns the kind of the normal output (adapter | full | merged).
    """
    from mergesafe.finetune.trainer import no_hf_progress_bars, save_model

    target = work / EMA_DIR
    if target.exists():
        shutil.rmtree(target)
    main = trainer.is_world_process_zero()
    if not cfg.lora:
        # the normal save casts the model to its checkpoint dtype; the EMA is cast the same way
        kind = save_model(trainer, tok, cfg, work, saved_dtype)
        if main:
            model = trainer.model
            with no_hf_progress_bars(), torch.no_grad():
                for n, p in trained_parameters(model).items():
                    p.copy_(ema.avg[n])
                model.save_pretrained(str(target))
                tok.save_pretrained(str(target))
            _write_manifest(target, "full", ema)
        return kind
    # LoRA: the EMA adapter first (merge_and_unload in the normal save removes the LoRA layers)
    if main:
        adapter_dir = target if not cfg.merge_adapter else work / ".ema-adapter"
        with no_hf_progress_bars(), ema_weights(trainer.model, ema.avg):
            trainer.model.save_pretrained(str(adapter_dir))
            tok.save_pretrained(str(adapter_dir))
    kind = save_model(trainer, tok, cfg, work, saved_dtype)
    if main and cfg.merge_adapter:
        from mergesafe.merge.api import merge

        merge(model_path, adapter_dir, target, method="linear", weight=1.0, dtype=saved_dtype,
              allow_pickle=cfg.allow_pickle)  # the user's choice, as for the training run
        (target / "mergesafe.json").unlink(missing_ok=True)
        adapter_dir.rename(target / "adapter")
    if main:
        _write_manifest(target, "merged" if cfg.merge_adapter else "adapter", ema)
    return kind


def _write_manifest(folder: Path, kind: str, ema: EmaCallback) -> None:
    data = {
        "tool": "mergesafe finetune --ema",
        "kind": kind,
        "ema": {"beta": ema.beta, "steps": ema.steps,
                "formula": "θ̄_0 = θ_pre; θ̄_t = β·θ̄_{t−1} + (1 − β)·θ_t after every optimiser step",
                "reference": "Kim et al. 2025, EMA in parameter space"},
        "of": "the trained parameters" + (" (LoRA factors A and B)" if kind != "full" else ""),
    }
    (folder / "mergesafe.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
