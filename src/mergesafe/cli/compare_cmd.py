"""Compare the related safety-restoration methods with the pre/post merge in the miniature world:
pre, post, the sweep's recommended merge, Safe LoRA, SafeMERGE, RESTA, LoX and parameter-space
EMA, each at its default settings, on the same held-out sets.  Runs the whole demo first
(`mergesafe demo --compare`), then writes OUT/compare.json and a "Related methods" table in
OUT/report.html, and prints the table (ASR, over-refusal, task score, extra inputs, extra
training, merge seconds).
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    quick: bool = typer.Option(False, "--quick", help="Smaller budget (weaker effects)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world's data and training."),
    lora: bool = typer.Option(False, "--lora", help="Post stage as a LoRA adapter instead of full fine-tuning."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Retrain stages 0-1 instead of reusing them from the cache."),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm: generate on vLLM "
                                "(the sweep: one engine, each merge loaded in place; float32 on CPU, where "
                                "vLLM's attention needs --quick's head size 32). Training stays on torch."),
) -> None:
    from mergesafe.world.demo import run_demo

    run_demo(out, quick=quick, seed=seed, lora=lora, overwrite=overwrite, cache=not no_cache,
             compare=True, backend=backend)
