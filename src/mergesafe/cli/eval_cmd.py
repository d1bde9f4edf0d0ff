"""Evaluate a model: attack success rate on harmful prompts, over-refusal on benign prompts, task scores.

Writes OUT/metrics.json and OUT/generations.jsonl (one row per prompt) and prints a table.
Example: mergesafe eval --model MODEL --out OUT --safety advbench.csv --over-refusal xstest.csv
--task gsm8k.jsonl --scorer numeric --judge keyword --limit 100.
The default judge, keyword, is a proxy (refusal markers of the AdvBench/GCG evaluations);
use wildguard:PATH (the paper's judge) for numbers you publish.
With --responses OUT/generations.jsonl instead of --model, it judges and scores saved responses
without loading a model (re-judge with a stronger judge, or score on a machine without the model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from mergesafe.cli.options import (
    BERTSCORE_LAYER,
    BERTSCORE_MODEL,
    BERTSCORE_RESCALE,
    GPU_MEMORY_UTILIZATION,
    HUMANEVAL_TIMEOUT,
    HUMANEVAL_WORKERS,
    JUDGE_HELP,
    JUDGE_MODEL,
    LIMIT,
    MAX_MODEL_LEN,
    NUM_SAMPLES,
    PASS_K,
    TEMPERATURE,
    TENSOR_PARALLEL_SIZE,
    TOP_K,
    TOP_P,
    VLLM_DTYPE,
    build_eval_config,
)


def command(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (safetensors + config + "
                                         "tokenizer). Not with --responses."),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Judge and score the responses of "
                                             "an earlier eval's generations.jsonl instead of generating: no "
                                             "model is loaded; rows are matched to the given sets by kind, "
                                             "set name and line, and their prompts must be equal. "
                                             "Generation options are ignored."),
    out: Path = typer.Option(..., "--out", help="Output folder (metrics.json, generations.jsonl)."),
    safety: Optional[list[Path]] = typer.Option(None, "--safety", help="Harmful prompt set (repeatable): a "
                                                "file, or a folder of header-less category files "
                                                "(HEx-PHI's category_1.csv ...; file stem = category)."),
    over_refusal: Optional[list[Path]] = typer.Option(None, "--over-refusal",
                                                      help="Benign prompt set, XSTest-style (repeatable)."),
    task: Optional[list[Path]] = typer.Option(None, "--task", help="Task set with references (repeatable)."),
    scorer: Optional[list[str]] = typer.Option(None, "--scorer",
                                               help="Scorer of each --task, in order: numeric, exact, "
                                                    "contains, choice, bertscore, humaneval (one value applies to "
                                                    "all). humaneval runs the model's code in a sandbox: "
                                                    "see --humaneval-timeout."),
    bertscore_model: Optional[Path] = BERTSCORE_MODEL,
    bertscore_layer: Optional[int] = BERTSCORE_LAYER,
    bertscore_rescale: bool = BERTSCORE_RESCALE,
    judge: str = typer.Option("keyword", "--judge", help=JUDGE_HELP),
    judge_model: Optional[str] = JUDGE_MODEL,
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder on top of --model."),
    limit: Optional[list[str]] = LIMIT,
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="N random prompts of each set."),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample and of sampled decoding (--temperature)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    repetition_penalty: float = typer.Option(1.2, "--repetition-penalty"),
    num_samples: int = NUM_SAMPLES,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: Optional[int] = TOP_K,
    pass_k: str = PASS_K,
    humaneval_timeout: float = HUMANEVAL_TIMEOUT,
    humaneval_workers: Optional[int] = HUMANEVAL_WORKERS,
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt"),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column"),
    category_column: Optional[str] = typer.Option(None, "--category-column"),
    reference_column: Optional[str] = typer.Option(None, "--reference-column"),
    lm_eval: Optional[list[str]] = typer.Option(None, "--lm-eval", help="Comma-separated lm-evaluation-harness "
                                                "tasks run on the loaded model, e.g. bbh_cot_fewshot,ifeval; "
                                                "results in metrics.json as task 'lm-eval:TASK:METRIC'. Each "
                                                "task's own prompts and decoding; --limit applies. Offline "
                                                "only: the data must be local (see README). Install: pip "
                                                "install 'mergesafe\\[lm-eval]'."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="Folder of extra lm-eval "
                                                   "task YAMLs (e.g. with dataset_path: json and local "
                                                   "data_files); they override registry tasks of the same name."),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm (needs vLLM: pip "
                                "install 'mergesafe\\[vllm]' on CPU, pip install vllm==0.32.0 on CUDA; a model "
                                "folder, optionally with a LoRA --adapter; not with --lm-eval)."),
    dtype: Optional[str] = VLLM_DTYPE,
    max_model_len: Optional[int] = MAX_MODEL_LEN,
    gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: Optional[int] = TENSOR_PARALLEL_SIZE,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin weights (torch.load "
                                      "with weights_only=True)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    from mergesafe.errors import UserError
    from mergesafe.evaluate.api import evaluate

    if (model is None) == (responses is None):
        raise UserError("--model and --responses exclude each other: --model generates responses, "
                        "--responses FILE judges and scores saved ones" if model else
                        "give --model MODEL or --responses FILE (an earlier eval's generations.jsonl)")
    engine = dict(dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                  tensor_parallel_size=tensor_parallel_size)
    if responses is not None and (adapter is not None or backend != "transformers"):
        raise UserError("--adapter and --backend need --model; --responses loads no model")
    config = build_eval_config(
        safety=safety, over_refusal=over_refusal, task=task, scorer=scorer, backend=backend, judge=judge,
        limit=limit, sample=sample, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, num_samples=num_samples, temperature=temperature, top_p=top_p,
        top_k=top_k, pass_k=pass_k, humaneval_timeout=humaneval_timeout, humaneval_workers=humaneval_workers,
        system_prompt=system_prompt, prompt_column=prompt_column,
        category_column=category_column, reference_column=reference_column, progress=progress,
        device=device, allow_pickle=allow_pickle, lm_eval=lm_eval, lm_eval_include=lm_eval_include, **engine,
        judge_model=judge_model, bertscore_model=bertscore_model, bertscore_layer=bertscore_layer,
        bertscore_rescale=bertscore_rescale)
    if responses is not None and config.lm_eval:
        raise UserError("--lm-eval runs on a loaded model: give --model, not --responses", path="--lm-eval")
    if responses is not None:
        from mergesafe.evaluate.responses import evaluate_responses

        metrics = evaluate_responses(responses, out=out, config=config, overwrite=overwrite)
    else:
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
