"""The training run itself: model (+ LoRA), `transformers.Trainer` arguments, train, save.

Plain `transformers.Trainer` with our own tokenization (`tokenize.py`) and a right-padding
collator: TRL's `SFTTrainer` masks assistant tokens only for templates with ``{% generation %}``
markers, which real chat models (Llama-3, Qwen, Gemma) do not have.  Per-step overhead is kept
low: no evaluation or saving unless asked, no reporting, no dataloader workers.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesafe.checkpoint.hf_model import load_causal_lm, no_hf_progress_bars
from mergesafe.finetune.callbacks import JsonlLogCallback, RichProgressCallback
from mergesafe.finetune.config import FinetuneConfig
from mergesafe.finetune.tokenize import PadCollator

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What the manifest and the summary report about a run."""

    global_step: int
    epoch: float
    runtime_s: float
    tokens_seen: int
    train_loss: float | None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"
    trainable_params: int = 0
    total_params: int = 0
    resumed_from_step: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.runtime_s if self.runtime_s > 0 else 0.0


def pick_precision(cfg: FinetuneConfig) -> str:
    """bf16 where the GPU has it, float32 on CPU (``auto``), or what the config forces."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def original_dtype(model) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 when it does not say)."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_model(model_path: Path, cfg: FinetuneConfig):
    """The model in float32 (mixed precision is the trainer's job), with LoRA when asked.
    Loaded through :func:`mergesafe.checkpoint.hf_model.load_causal_lm` (validated headers, no
    custom code, no pickles unless ``cfg.allow_pickle``)."""
    from transformers import set_seed

    model = load_causal_lm(model_path, dtype=torch.float32, allow_pickle=cfg.allow_pickle)
    saved_dtype = original_dtype(model)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        set_seed(cfg.seed)  # LoRA A matrices are initialised randomly
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            model = get_peft_model(model, lora)
    return model, saved_dtype


def training_arguments(cfg: FinetuneConfig, work: Path, precision: str, has_val: bool,
                       resuming: bool):
    from transformers import TrainingArguments

    if has_val:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    else:
        eval_strategy = "no"
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **_checkpointing_args(TrainingArguments, cfg.gradient_checkpointing),
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        eval_on_start=has_val and not resuming,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        log_level="warning",
    )


def _checkpointing_args(args_cls, enabled: bool) -> dict:
    """Gradient (activation) checkpointing, under the argument name this transformers uses."""
    if not enabled:
        return {}
    import inspect

    name = ("activation_checkpointing" if "activation_checkpointing" in
            inspect.signature(args_cls.__init__).parameters else "gradient_checkpointing")
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def train(model_path: Path, tok, train_rows: list[dict], val_rows: list[dict], cfg: FinetuneConfig,
          work: Path, resume_from: Path | None = None, callbacks: list[Any] | None = None):
    """Run the trainer in `work`; returns (trainer, TrainResult, saved dtype)."""
    from transformers import Trainer

    precision = pick_precision(cfg)
    model, saved_dtype = load_model(model_path, cfg)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    resume_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    log_cb = JsonlLogCallback(work / "train_log.jsonl", resume_step=resume_step)
    cbs: list[Any] = [log_cb]
    progress = RichProgressCallback() if cfg.progress else None
    if progress:
        cbs.append(progress)
    cbs += list(callbacks or [])
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, work, precision, bool(val_rows), resume_from is not None),
        train_dataset=train_rows,
        eval_dataset=val_rows or None,
        data_collator=PadCollator(tok.pad_token_id),
        processing_class=tok,
        callbacks=cbs,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # our log file and progress bar replace them
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        with warnings.catch_warnings(), no_hf_progress_bars():
            # transformers' own deprecated call inside Trainer: nothing a user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            if progress:
                progress.close()
            step = trainer.state.global_step
            if val_rows and (not log_cb.val_history or log_cb.val_history[-1][0] != step):
                trainer.evaluate()  # the final validation loss, logged at the last step
    finally:
        torch.set_num_threads(threads)
        if progress:
            progress.close()
    state = trainer.state
    runtime = time.perf_counter() - start
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = str(trainer.args.device)
    result = TrainResult(
        global_step=state.global_step,
        epoch=float(state.epoch or 0.0),
        runtime_s=float(out.metrics.get("train_runtime", runtime)),
        tokens_seen=int(state.num_input_tokens_seen or 0) - _tokens_at(resume_from),
        train_loss=float(out.training_loss) if out.training_loss is not None else None,
        val_losses=list(log_cb.val_history),
        precision=precision,
        device=device,
        trainable_params=n_train,
        total_params=n_total,
        resumed_from_step=resume_step,
    )
    return trainer, result, saved_dtype


def _tokens_at(checkpoint: Path | None) -> int:
    """Tokens already counted in a resumed checkpoint's trainer state."""
    if checkpoint is None:
        return 0
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0) or 0)


def save_model(trainer, tok, cfg: FinetuneConfig, work: Path, saved_dtype: torch.dtype) -> str:
    """Write the final model into `work`; returns what was written: adapter | full | merged."""
    with no_hf_progress_bars():
        return _save_model(trainer, tok, cfg, work, saved_dtype)


def _save_model(trainer, tok, cfg: FinetuneConfig, work: Path, saved_dtype: torch.dtype) -> str:
    model = trainer.model
    if not trainer.is_world_process_zero():
        return "adapter" if cfg.lora and not cfg.merge_adapter else ("merged" if cfg.lora else "full")
    tok.save_pretrained(str(work))
    if cfg.lora and not cfg.merge_adapter:
        model.save_pretrained(str(work))
        return "adapter"
    if cfg.lora:
        # Keep the adapter too (OUT/adapter), then write the merged full weights.
        model.save_pretrained(str(work / "adapter"))
        tok.save_pretrained(str(work / "adapter"))
        model = model.merge_and_unload()
        kind = "merged"
    else:
        kind = "full"
    model.config.use_cache = True
    model.to(saved_dtype).save_pretrained(str(work))
    return kind
