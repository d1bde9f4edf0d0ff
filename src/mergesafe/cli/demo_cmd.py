"""Run the whole loop in a miniature world on the CPU, in minutes: train a tiny chat model
(unaligned → safety-aligned = pre), fine-tune it on a benign task (= post; safety drops), then
sweep merges of pre and post (linear, slerp, ties, dare_linear × λ) and pick the one that keeps
the task gain at pre's safety.  Writes OUT/summary.json, results.jsonl, report.html and
frontier.png, and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    quick: bool = typer.Option(False, "--quick", help="Smaller budget (about a minute; weaker effects)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world's data and training."),
    lora: bool = typer.Option(False, "--lora", help="Post stage as a LoRA adapter instead of full fine-tuning."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Retrain stages 0-1 instead of reusing them from the cache."),
    compare: bool = typer.Option(False, "--compare",
                                 help="Also compare the related safety-restoration methods "
                                      "(as `mergesafe compare`): OUT/compare.json and a report table."),
) -> None:
    from mergesafe.world.demo import run_demo

    run_demo(out, quick=quick, seed=seed, lora=lora, overwrite=overwrite, cache=not no_cache,
             compare=compare)
