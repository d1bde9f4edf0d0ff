"""`FinetuneConfig`: every hyper-parameter of `mergesafe finetune`, with the paper's defaults.

Defaults follow Farn et al. (arXiv 2412.19512), who fine-tune with LoRA r=8, alpha=16 on all
linear layers, lr 1e-4 with a cosine schedule and 10% warm-up, batch 8, 3 epochs, a 1024-token
cutoff and a 10% validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DataFormat = Literal["auto", "chat", "prompt_response", "alpaca", "text"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


class FinetuneConfig(BaseModel):
    """Hyper-parameters and options of one supervised fine-tuning run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- method -------------------------------------------------------------------------
    lora: bool = Field(True, description="LoRA adapter (True) or full fine-tuning (False).")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="peft target modules; 'all-linear' = every linear layer but lm_head.")
    merge_adapter: bool = Field(False, description="Save merged full weights instead of the adapter.")
    ema: float | None = Field(
        None, ge=0, le=1, description="β of an EMA of the trained parameters in parameter space "
        "(Kim et al. 2025), θ̄ ← β·θ̄ + (1−β)·θ after every optimiser step from the pre weights; "
        "written to OUT/ema (None: off).")

    # --- optimisation ---------------------------------------------------------------------
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    group_by_length: bool = Field(
        False, description="Batch rows of similar length together (less padding, faster; the "
        "order is still shuffled by the seed).")
    precision: Precision = Field("auto", description="auto = bf16 where the GPU has it, else fp32.")
    seed: int = 42
    cpu_threads: int | None = Field(
        None, ge=1, description="torch CPU threads for this run (None: torch's default). On a busy "
        "machine 1 thread can be many times faster for tiny models.")

    # --- data ---------------------------------------------------------------------------
    format: DataFormat = "auto"
    max_length: int = Field(1024, ge=2)
    val_size: float = Field(0.1, ge=0, description="Fraction (< 1) or number of rows (>= 1).")
    system_prompt: str | None = None
    chat_template: Path | None = Field(None, description="Jinja file used when the model has none.")
    allow_pickle: bool = Field(
        False, description="Accept a model whose weights are .bin (pickle) files, loaded with "
        "torch.load(weights_only=True); without it only safetensors weights are read.")

    # --- logging, checkpoints, output ----------------------------------------------------
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps (default: at start, each epoch, end).")
    save_steps: int | None = Field(None, ge=1, description="Keep a checkpoint-N every N steps.")
    save_total_limit: int | None = Field(None, ge=1)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.merge_adapter and not self.lora:
            raise ValueError("merge_adapter needs lora=True")
        return self

    def to_manifest(self) -> dict:
        """JSON-ready dict of all settings."""
        return self.model_dump(mode="json")
