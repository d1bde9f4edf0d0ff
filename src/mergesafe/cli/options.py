"""Evaluation options shared by `eval` and `sweep`: one place that turns flags into an EvalConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mergesafe.errors import UserError

# Sampled decoding and HumanEval: the same options (and help) on `eval` and `sweep`.
NUM_SAMPLES = typer.Option(1, "--num-samples", min=1, max=1000, help="Samples per task prompt. Only task "
                           "sets are sampled: safety and over-refusal sets are always decoded greedily, as "
                           "in the paper. Above 1 needs --temperature > 0. generations.jsonl keeps every "
                           "sample (key `sample`, 0..N-1); the set's score is the mean over all samples "
                           "(humaneval: pass@k).")
TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature of task sets (0 = "
                           "greedy, the default). The paper's HumanEval: --num-samples 50 --temperature 0.6 "
                           "--top-p 0.9 --top-k 50 --max-new-tokens 512 --pass-k 10. Seeded by --seed.")
TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling of task sets (1 = off).")
TOP_K = typer.Option(None, "--top-k", min=1, help="Top-k sampling of task sets (default: off).")
PASS_K = typer.Option("1,10", "--pass-k", help="humaneval: comma-separated k of pass@k (unbiased "
                      "estimator, Chen et al. 2021); the score is pass@ the first k; a k above "
                      "--num-samples is omitted (listed under pass@k_omitted).")
HUMANEVAL_TIMEOUT = typer.Option(
    3.0, "--humaneval-timeout", min=0.01, help="humaneval: wall-clock seconds per sample. Each sample runs "
    "the model's code in its own process: timeout; setrlimit limits (512 MiB address space, CPU seconds, "
    "16 MiB file size, 64 open files, no core dumps, 32 processes); its own temporary folder as working "
    "folder; stdin closed; an empty environment; python -I -S; no network where the OS lets it make a "
    "network namespace (root, or unprivileged user namespaces); as root, a fresh user id of its own "
    "(other users' files stay unwritable, and every process it started is killed afterwards); a Python "
    "audit hook that refuses writing outside its folder, starting processes, sockets and ctypes. NOT "
    "isolated: reading files (as root, any file); the network where no namespace could be made; the audit "
    "hook is no security boundary against deliberately hostile code (use a container or VM for that).")
HUMANEVAL_WORKERS = typer.Option(None, "--humaneval-workers", min=1, max=256,
                                 help="humaneval: samples run at once (default: the CPU count).")


BERTSCORE_MODEL = typer.Option(None, "--bertscore-model", help="--scorer bertscore: local model folder "
                               "(the paper's: microsoft/deberta-xlarge-mnli).")
BERTSCORE_LAYER = typer.Option(None, "--bertscore-layer", min=0, help="Layer of the BERTScore embeddings "
                               "(default: bert_score's for the model, 40 for deberta-xlarge-mnli; needed for "
                               "a model it does not know).")
BERTSCORE_RESCALE = typer.Option(False, "--bertscore-rescale", help="Rescale F1 with bert_score's English "
                                 "baseline for the model (off, as in the paper).")
JUDGE_HELP = ("keyword | llama-guard:PATH | wildguard:PATH | harmbench:PATH | FORMAT@URL: a judge behind an "
              "OpenAI-compatible chat endpoint (vllm serve, OpenAI), FORMAT one of wildguard, llama-guard, "
              "harmbench, gpt (the paper's safe/unsafe/invalid labelling prompt), URL the API base, e.g. "
              "wildguard@http://127.0.0.1:8000/v1. Its key is read from MERGESAFE_JUDGE_API_KEY (never "
              "written anywhere); each request is tried at most 4 times, with exponential backoff.")
JUDGE_MODEL = typer.Option(None, "--judge-model", help="Model of a FORMAT@URL judge, e.g. gpt-4o-mini "
                           "(default: the first one the endpoint lists at GET URL/models).")
# The vLLM engine (`--backend vllm` only; refused with the transformers backend).
VLLM_DTYPE = typer.Option(None, "--dtype", help="--backend vllm: the engine's dtype, auto | float32 | "
                          "bfloat16 | float16 (default: float32 on CPU, the checkpoint's on CUDA). On CPU a "
                          "start-up check compares vLLM's first greedy tokens with transformers' (float32) "
                          "and refuses a dtype that changes the text.")
MAX_MODEL_LEN = typer.Option(None, "--max-model-len", min=16, help="--backend vllm: context length of the "
                             "engine, prompt plus answer (default: the model's).")
GPU_MEMORY_UTILIZATION = typer.Option(None, "--gpu-memory-utilization", min=0.01, max=1.0,
                                      help="--backend vllm: share of the GPU's memory vLLM takes (vLLM's "
                                           "default 0.92; 0.45 for each engine when a model judge runs on "
                                           "vLLM beside the generator).")
TENSOR_PARALLEL_SIZE = typer.Option(None, "--tensor-parallel-size", min=1, help="--backend vllm: GPUs one "
                                    "engine spans (default 1).")
LIMIT = typer.Option(None, "--limit", help="First N prompts of each set: N, or SET=N for one set (its "
                     "file stem) or one kind (safety, over-refusal, task); repeatable, e.g. --limit 100 "
                     "--limit over-refusal=50 --limit xstest=25 (a set's own limit wins over its kind's, "
                     "which wins over N).")


def parse_limits(values: list[str] | int | None) -> tuple[int | None, dict[str, int]]:
    """`--limit 100 --limit over-refusal=50` → (100, {"over-refusal": 50})."""
    if values is None or isinstance(values, int):
        return values, {}
    default: int | None = None
    per_set: dict[str, int] = {}
    for text in values:
        name, sep, number = str(text).rpartition("=")
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n < 1 or (sep and not name.strip()):
            raise UserError(f"--limit: expected N or SET=N with N a positive integer, got {str(text)[:80]!r}")
        if sep:
            per_set[name.strip()] = n
        else:
            default = n
    return default, per_set


def parse_pass_k(text: str | list[int]) -> list[int]:
    """`--pass-k 1,10` → [1, 10] (each k a positive integer)."""
    if isinstance(text, list):
        return text
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--pass-k: expected comma-separated integers, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--pass-k: expected positive integers, got {text!r}")
    return ks


def build_eval_config(*, safety: list[Path] | None, over_refusal: list[Path] | None,
                      task: list[Path] | None, scorer: list[str] | None, backend: str = "transformers",
                      lm_eval: str | list[str] | None = None, **settings: Any):
    """Pair each `--task` with its `--scorer` (one scorer applies to all), validate, build EvalConfig.

    `lm_eval` is `--lm-eval`'s comma-separated task names (the option may be repeated)."""
    from pydantic import ValidationError

    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.harness import parse_task_list

    from mergesafe.evaluate.scorers.registry import scorer_names

    if "pass_k" in settings:
        settings["pass_k"] = parse_pass_k(settings["pass_k"])
    if "limit" in settings:
        settings["limit"], settings["set_limits"] = parse_limits(settings["limit"])
    tasks = list(task or [])
    scorers = list(scorer or [])
    if tasks and not scorers:
        raise UserError(f"every --task needs a --scorer ({', '.join(scorer_names())})", path=tasks[0])
    if scorers and len(scorers) == 1:
        scorers = scorers * len(tasks)
    if len(scorers) != len(tasks):
        raise UserError(f"{len(tasks)} --task sets but {len(scorers)} --scorer values")
    if backend not in ("transformers", "vllm"):
        raise UserError(f"unknown backend {backend!r} (transformers or vllm)")
    try:
        return EvalConfig(safety=list(safety or []), over_refusal=list(over_refusal or []),
                          task=list(zip(tasks, scorers)), backend=backend,
                          lm_eval=parse_task_list(lm_eval), **settings)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "-".join(str(x) for x in first["loc"][:1]).replace("_", "-")
        raise UserError(f"--{flag}: {first['msg']}") from None
