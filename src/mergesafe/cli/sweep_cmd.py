"""Sweep merge methods × merge weights λ, evaluate each merge in memory, and recommend one to ship.

Pre (λ = 0) and post (λ = 1) are evaluated too.  Every finished trial is appended to
OUT/results.jsonl at once, so running the same command again after a kill resumes.  Writes
OUT/recommendation.json, OUT/report.html (self-contained, plots embedded; it opens with the prompts
whose verdict flipped), OUT/examples.jsonl, OUT/frontier.png, and each trial's responses in
OUT/generations/KEY.jsonl.  --ray spreads the trials over a Ray cluster.
Example: mergesafe sweep --pre PRE --post POST --out OUT --methods linear,slerp,ties,dare_linear
--weights 0.1:0.9:0.1 --safety advbench.csv --over-refusal xstest.csv --task val.jsonl --scorer numeric.
Recommendation: the highest task score among merges whose ASR on every safety set is at most the
pre model's + --asr-tolerance and whose over-refusal is at most pre's + --refusal-tolerance;
when none qualifies, pre itself (the reason names the safest merge); --save-best then writes nothing.
"""

from __future__ import annotations

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
    pre: Path = typer.Option(..., "--pre", help="The aligned model before fine-tuning (model folder)."),
    post: list[Path] = typer.Option(..., "--post", help="The fine-tuned model: a model folder or a PEFT "
                                                       "LoRA adapter of --pre (repeatable: the posts' weights "
                                                       "are averaged, or see --each-post)."),
    out: Path = typer.Option(..., "--out", help="Output folder (results.jsonl, recommendation.json, "
                                                "report.html, frontier.png); reused to resume."),
    methods: str = typer.Option("linear", "--methods", help="Comma-separated merge methods (see `merge`)."),
    weights: str = typer.Option("0.1:0.9:0.1", "--weights", help="λ grid: start:stop:step or a list 0.25,0.5."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="Method parameter METHOD.NAME=VALUE, e.g. "
                                              "ties.density=0.5 (without METHOD: every method; repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random methods (DARE, DELLA), of --sample "
                             "and of sampled decoding (--temperature)."),
    anchor: Optional[Path] = typer.Option(None, "--anchor", help="Third model for model_stock."),
    select_on: Optional[Path] = typer.Option(None, "--select-on", help="Validation task set used to pick "
                                             "the merge (test sets are reported beside it), or an lm-eval "
                                             "result lm-eval:TASK:METRIC of a --lm-eval task, e.g. "
                                             "lm-eval:ifeval:prompt_level_strict_acc."),
    select_scorer: Optional[str] = typer.Option(None, "--select-scorer", help="Scorer of --select-on "
                                                "(default: that of the first --task)."),
    asr_tolerance: float = typer.Option(0.02, "--asr-tolerance", min=0.0, max=1.0,
                                        help="ASR allowed above the pre model's, per safety set (fraction)."),
    refusal_tolerance: float = typer.Option(0.02, "--refusal-tolerance", min=0.0, max=1.0,
                                            help="Over-refusal allowed above the pre model's (fraction)."),
    save_best: bool = typer.Option(False, "--save-best", help="Write the recommended model to OUT/best "
                                   "through the merge engine."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard OUT's earlier results."),
    safety: Optional[list[Path]] = typer.Option(None, "--safety", help="Harmful prompt set (repeatable)."),
    over_refusal: Optional[list[Path]] = typer.Option(None, "--over-refusal", help="Benign prompt set, "
                                                      "XSTest-style (repeatable)."),
    task: Optional[list[Path]] = typer.Option(None, "--task", help="Task set with references (repeatable)."),
    scorer: Optional[list[str]] = typer.Option(None, "--scorer", help="Scorer of each --task: numeric, "
                                               "exact, contains, choice, bertscore, humaneval (one value applies to all; "
                                               "humaneval: see "
                                               "--humaneval-timeout)."),
    judge: str = typer.Option("keyword", "--judge", help=JUDGE_HELP),
    judge_model: Optional[str] = JUDGE_MODEL,
    limit: Optional[list[str]] = LIMIT,
    sample: Optional[int] = typer.Option(None, "--sample", min=1, help="N random prompts of each set."),
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
    bertscore_model: Optional[Path] = BERTSCORE_MODEL,
    bertscore_layer: Optional[int] = BERTSCORE_LAYER,
    bertscore_rescale: bool = BERTSCORE_RESCALE,
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt"),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column"),
    category_column: Optional[str] = typer.Option(None, "--category-column"),
    reference_column: Optional[str] = typer.Option(None, "--reference-column"),
    lm_eval: Optional[list[str]] = typer.Option(None, "--lm-eval", help="Comma-separated lm-evaluation-harness "
                                                "tasks run on each trial's merged model in memory, e.g. "
                                                "bbh_cot_fewshot,ifeval; results as task 'lm-eval:TASK:METRIC'. "
                                                "Each task's own prompts and decoding; --limit applies. Offline "
                                                "only (see README). Install: pip install 'mergesafe\\[lm-eval]'."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="Folder of extra lm-eval "
                                                   "task YAMLs (e.g. with dataset_path: json and local "
                                                   "data_files); they override registry tasks of the same name."),
    backend: str = typer.Option("transformers", "--backend", help="transformers | vllm: one vLLM engine "
                                "starts on --pre and each trial's merge is loaded into it in place (no "
                                "checkpoint written; needs vLLM: pip install 'mergesafe\\[vllm]' on CPU, pip "
                                "install vllm==0.32.0 on CUDA; not with --lm-eval)."),
    dtype: Optional[str] = VLLM_DTYPE,
    max_model_len: Optional[int] = MAX_MODEL_LEN,
    gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: Optional[int] = TENSOR_PARALLEL_SIZE,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin weights (torch.load "
                                      "with weights_only=True)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    each_post: bool = typer.Option(False, "--each-post", help="With several --post (fine-tuning seeds): "
                                   "merge and evaluate each one on its own, one trial per (post, method, λ), "
                                   "and rank the mean over posts, as the paper reports seeds. Default: "
                                   "the posts' weights are averaged into one merge."),
    ray: bool = typer.Option(False, "--ray", help="Run the trials on Ray, over every GPU (or CPU) "
                             "of a cluster; this process alone writes OUT. Install: pip install "
                             "'mergesafe\\[ray]'."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="'auto' (or RAY_ADDRESS set) "
                                              "joins a running cluster; without either a local one is "
                                              "started. The --pre/--post/prompt paths must be readable on "
                                              "every node."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray workers (default: one "
                                          "per GPU; on CPU, one per two cores)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", min=0.0,
                                                    help="GPUs reserved by each Ray worker (default 1 when "
                                                         "the cluster has GPUs). The transformers backend "
                                                         "runs on one of them; several are for tensor "
                                                         "parallel: --backend vllm with "
                                                         "--tensor-parallel-size.")
) -> None:
    from mergesafe.api import sweep
    from mergesafe.errors import UserError
    from mergesafe.sweep.api import SweepInterrupted
    from mergesafe.sweep.ray_pool import RayOptions
    from mergesafe.sweep.grid import parse_method_params, parse_methods, parse_weights
    from mergesafe.sweep.table import print_sweep

    method_list = parse_methods(methods)
    grid = parse_weights(weights)
    params = parse_method_params(list(param or []), method_list)
    config = build_eval_config(
        safety=safety, over_refusal=over_refusal, task=task, scorer=scorer, judge=judge,
        judge_model=judge_model, limit=limit,
        sample=sample, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty, num_samples=num_samples, temperature=temperature, top_p=top_p,
        top_k=top_k, pass_k=pass_k, humaneval_timeout=humaneval_timeout, humaneval_workers=humaneval_workers,
        bertscore_model=bertscore_model, bertscore_layer=bertscore_layer, bertscore_rescale=bertscore_rescale,
        system_prompt=system_prompt, prompt_column=prompt_column,
        category_column=category_column, reference_column=reference_column, device=device,
        allow_pickle=allow_pickle, lm_eval=lm_eval, lm_eval_include=lm_eval_include, backend=backend,
        dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size)
    if not ray and (ray_address is not None or workers is not None or gpus_per_worker is not None):
        raise UserError("--ray-address, --workers and --gpus-per-worker need --ray")
    ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker) if ray else None
    try:
        result = sweep(pre, post if len(post) > 1 else post[0], out, methods=method_list, weights=grid,
                       eval_config=config, params=params, select_on=select_on, select_scorer=select_scorer,
                       asr_tolerance=asr_tolerance, refusal_tolerance=refusal_tolerance,
                       save_best=save_best, overwrite=overwrite, progress=progress, seed=seed,
                       anchor=anchor, allow_pickle=allow_pickle, ray=ray_options, each_post=each_post)
    except SweepInterrupted as err:
        typer.echo(f"mergesafe: interrupted: {err.finished} of {err.total} trials are finished and kept in "
                   f"{err.out / 'results.jsonl'}; run the same command again to resume", err=True)
        raise SystemExit(128 + err.signum if err.signum else 130) from None
    print_sweep(result)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"{result.computed} trials computed, {result.reused} reused; wrote {out / 'results.jsonl'}, "
               f"{out / 'recommendation.json'}, {out / 'report.html'}, {out / 'frontier.png'}"
               + (f", {result.best_model}" if result.best_model else ""))
