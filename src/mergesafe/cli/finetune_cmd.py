"""Fine-tune a chat model on a task (LoRA or full): the post model that `merge` takes.

Data: JSONL, JSON, CSV or a `datasets` folder; rows in chat (`messages`), prompt/response (question/answer), Alpaca (instruction/input/output) or plain-text (`text`) form. Loss on the assistant tokens only, rendered with the model's own chat template. Defaults follow the paper: LoRA r=8 alpha=16 on all linear layers, lr 1e-4 cosine, warm-up 0.1, 3 epochs, batch 8, cutoff 1024.

Training runs in OUT.partial (checkpoints there; --resume continues from the last one) and is renamed to OUT when done. Several GPUs: `accelerate launch -m mergesafe finetune ...`.

Example: mergesafe finetune --model PRE --data task.jsonl --out POST --lora --max-steps 500
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def command(
    model: Path = typer.Option(..., "--model", help="The aligned (pre) model folder."),
    data: Path = typer.Option(..., "--data", help="Training data: .jsonl, .json, .csv or a datasets folder."),
    out: Path = typer.Option(..., "--out", help="Output folder (adapter or full weights, logs, manifest)."),
    lora: bool = typer.Option(True, "--lora/--full", help="LoRA adapter (default) or full fine-tuning."),
    merge_adapter: bool = typer.Option(False, "--merge-adapter",
                                       help="With LoRA: save merged full weights (adapter kept in OUT/adapter)."),
    data_format: str = typer.Option("auto", "--format",
                                    help="auto | chat | prompt_response | alpaca | text"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt",
                                                help="System message added to rows that have none."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template",
                                                 help="Jinja chat template file, for a model without one."),
    max_length: int = typer.Option(1024, "--max-length", min=2, help="Token cutoff per row."),
    val_size: float = typer.Option(0.1, "--val-size", min=0.0,
                                   help="Held-out validation rows: a fraction (< 1) or a count."),
    epochs: float = typer.Option(3.0, "--epochs", min=0.0),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after N optimiser steps."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Per-device batch size."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
    lr_scheduler: str = typer.Option("cosine", "--lr-scheduler"),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    group_by_length: bool = typer.Option(
        False, "--group-by-length", help="Batch rows of similar length together (less padding)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on a GPU that has it) | bf16 | fp16 | fp32"),
    seed: int = typer.Option(42, "--seed"),
    logging_steps: int = typer.Option(10, "--logging-steps", min=1),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", min=1,
                                             help="Validation loss every N steps (default: each epoch)."),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", min=1,
                                             help="Keep OUT/checkpoint-N every N steps."),
    cpu_threads: Optional[int] = typer.Option(None, "--cpu-threads", min=1, help="torch CPU threads."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept a model whose weights are "
                                      ".bin files (torch.load with weights_only=True)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A progress bar; without it, one "
                                  "line per logging step (step, loss, lr, tokens/s)."),
    ema: Optional[float] = typer.Option(
        None, "--ema", metavar="BETA",
        help="Also keep an EMA of the trained parameters in parameter space (Kim et al. 2025): "
             "θ̄ ← β·θ̄ + (1−β)·θ after every optimiser step, from the pre weights; written to "
             "OUT/ema (a full model for --full, an adapter of the EMA of the LoRA factors for "
             "LoRA, merged weights with --merge-adapter). Costs one float32 copy of the trained "
             "parameters."),
) -> None:
    from mergesafe.finetune.api import MANIFEST, finetune, make_config

    config = make_config(
        lora=lora, merge_adapter=merge_adapter, format=data_format, system_prompt=system_prompt,
        chat_template=chat_template, max_length=max_length, val_size=val_size, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, learning_rate=lr,
        lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing, group_by_length=group_by_length, precision=precision, seed=seed,
        logging_steps=logging_steps, eval_steps=eval_steps, save_steps=save_steps,
        cpu_threads=cpu_threads, resume=resume, overwrite=overwrite, progress=progress, ema=ema,
        allow_pickle=allow_pickle,
    )
    from mergesafe.finetune.callbacks import LogLinesCallback

    # without the bar, one line per logging step (step, loss, lr, tokens/s) instead of silence
    result = finetune(model, data, out, config, callbacks=None if progress else [LogLinesCallback()])
    print_summary(json.loads((result / MANIFEST).read_text()), result)


def print_summary(manifest: dict, out: Path) -> None:
    """A short table: what was trained, losses, throughput, where it went."""
    from rich.console import Console
    from rich.table import Table

    tr, data = manifest["training"], manifest["data"]
    vals = tr["val_losses"]
    table = Table(title="fine-tuning summary", show_header=False)
    table.add_row("output", f"{out} ({manifest['kind']})")
    if manifest.get("ema"):
        table.add_row("EMA model", f"{out / manifest['ema']['path']} (β = {manifest['ema']['beta']})")
    table.add_row("rows", f"{data['train_rows']} train / {data['val_rows']} val "
                          f"({data['truncated_rows']} truncated, {data['dropped_rows']} dropped)")
    table.add_row("steps", f"{tr['global_step']} (epoch {tr['epoch']:.2f}"
                           + (f", resumed at {tr['resumed_from_step']}" if tr["resumed_from_step"] else "") + ")")
    if tr["train_loss"] is not None:
        table.add_row("train loss (mean)", f"{tr['train_loss']:.4f}")
    if vals:
        table.add_row("val loss", f"{vals[0]['val_loss']:.4f} (step {vals[0]['step']}) → "
                                  f"{vals[-1]['val_loss']:.4f} (step {vals[-1]['step']})")
    table.add_row("throughput", f"{tr['tokens_per_s']:.0f} tokens/s, {tr['train_runtime_s']:.1f} s, "
                                f"{tr['precision']} on {tr['device']}")
    table.add_row("trainable params", f"{tr['trainable_params']:,} of {tr['total_params']:,}")
    Console(stderr=True).print(table)
