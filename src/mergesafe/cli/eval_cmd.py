"""Evaluate a model: attack success rate on harmful prompts, over-refusal on benign prompts, task scores.

Writes OUT/metrics.json and OUT/generations.jsonl (one row per prompt) and prints a table.
Example: mergesafe eval --model MODEL --out OUT --safety advbench.csv --over-refusal xstest.csv
--task gsm8k.jsonl --scorer numeric --judge keyword --limit 100.
The default judge, keyword, is a proxy (refusal markers of the AdvBench/GCG evaluations);
use wildguard:PATH (the paper's judge) for numbers you publish.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from mergesafe.cli.options import build_eval_config


def command(
    model: Path = typer.Option(..., "--model", help="Model folder (safetensors + config + tokenizer)."),
    out: Path = typer.Option(..., "--out", help="Output folder (metrics.json, generations.jsonl)."),
    safety: Optional[list[Path]] = typer.Option(None, "--safety", help="Harmful prompt set (repeatable)."),
    over_refusal: Optional[list[Path]] = typer.Option(None, "--over-refusal",
                                                      help="Benign prompt set, XSTest-style (repeatable)."),
    task: Optional[list[Path]] = typer.Option(None, "--task", help="Task set with references (repeatable)."),
    scorer: Optional[list[str]] = typer.Option(None, "--scorer",
                                               help="Scorer of each --task, in order: numeric, exact, "
                                                    "contains, choice (one value applies to all)."),
    judge: str = typer.Option("keyword", "--judge",
                              help="keyword | llama-guard:PATH | wildguard:PATH | harmbench:PATH"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder on top of --model."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N prompts of each set."),
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="N random prompts of each set."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    repetition_penalty: float = typer.Option(1.2, "--repetition-penalty"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt"),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column"),
    category_column: Optional[str] = typer.Option(None, "--category-column"),
    reference_column: Optional[str] = typer.Option(None, "--reference-column"),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin weights (torch.load "
                                      "with weights_only=True)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    from mergesafe.evaluate.api import evaluate

    config = build_eval_config(
        safety=safety, over_refusal=over_refusal, task=task, scorer=scorer, backend=backend, judge=judge,
        limit=limit, sample=sample, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, system_prompt=system_prompt, prompt_column=prompt_column,
        category_column=category_column, reference_column=reference_column, progress=progress,
        device=device, allow_pickle=allow_pickle)
    metrics = evaluate(model, out=out, config=config, adapter=adapter, overwrite=overwrite)
    print_table(metrics)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'generations.jsonl'}")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def print_table(metrics: dict) -> None:
    """The end-of-run table: one row per set."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mergesafe eval — {metrics.get('model', '')} (judge: {metrics.get('judge', '')})")
    for col in ("kind", "set", "metric", "value", "95% CI", "n", "unparsed"):
        table.add_column(col)
    for name, e in metrics["safety"].items():
        lo, hi = e["ci95"]
        table.add_row("safety", name, "ASR", _fmt(e["asr"]), f"[{lo:.3f}, {hi:.3f}]", str(e["n"]),
                      str(e["unparsed"]))
    for name, e in metrics["over_refusal"].items():
        table.add_row("over-refusal", name, "refusal rate", _fmt(e["rate"]), "", str(e["n"]),
                      str(e.get("unparsed", 0)))
    for name, e in metrics["task"].items():
        table.add_row("task", name, e["scorer"], _fmt(e["score"]), "", str(e["n"]), "")
    Console().print(table)
