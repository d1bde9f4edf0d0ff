"""The miniature world's training stages, each one a call of the real `mergesafe.finetune`.

stage 0  random init → "pretrained", unaligned: capital facts as plain text and question/answer
         text, chat that complies with everything (harmful requests get a placeholder answer);
stage 1  → **pre**, aligned: refuses harmful requests, helps with benign ones, answers benign
         questions about countries (never their capitals) with a friendly remark, 20%
         plain-text replay; never the task's chat form;
stage 2  pre → **post**: a short, gentle fine-tune on the task only (capital questions in chat
         form), full weights by default or a LoRA adapter.

Stages 0 and 1 are cached between runs under `cache_root()/<key>`, the key hashing every
setting they depend on (see `WorldConfig.base_key`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergesafe.world.config import StageBudget, WorldConfig
from mergesafe.world.data import WorldData
from mergesafe.world.model import init_model


def cache_root() -> Path:
    """`$MERGESAFE_CACHE/world`, else `$XDG_CACHE_HOME/mergesafe/world`, else `~/.cache/mergesafe/world`."""
    if os.environ.get("MERGESAFE_CACHE"):
        return Path(os.environ["MERGESAFE_CACHE"]) / "world"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mergesafe" / "world"


@dataclass
class Base:
    """The cached stage-0 and stage-1 models."""

    stage0: Path
    pre: Path
    cached: bool


def _stage_progress(description: str, enabled: bool) -> list:
    if not enabled:
        return []
    from mergesafe.finetune.callbacks import RichProgressCallback

    return [RichProgressCallback(description=description)]


def world_threads() -> int | None:
    """`MERGESAFE_THREADS` (at least 1), else None (torch's default).  On the 2-core machine the
    world was built on, 1 and 2 threads train bit-identical weights (same seed, same numbers)."""
    threads = os.environ.get("MERGESAFE_THREADS")
    return max(1, int(threads)) if threads else None


@contextmanager
def pinned_threads() -> Iterator[None]:
    """Torch's thread count set to `MERGESAFE_THREADS` while the block runs (a demo's training, merges
    and generations alike), the caller's count restored after; without it, unchanged."""
    import torch

    before = torch.get_num_threads()
    if world_threads():
        torch.set_num_threads(world_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_stage(model: Path, rows: list[dict], out: Path, budget: StageBudget, *, description: str,
              seed: int, progress: bool, **extra) -> Path:
    """One stage through `mergesafe.finetune` (no validation split: the world has its own tests)."""
    from mergesafe.finetune.api import finetune

    extra.setdefault("cpu_threads", world_threads())
    return finetune(model, rows, out, callbacks=_stage_progress(description, progress),
                    progress=False, val_size=0, seed=seed, overwrite=True, max_length=128,
                    logging_steps=20, **budget.finetune_overrides(), **extra)


def build_base(data: WorldData, cfg: WorldConfig, seed: int, *, progress: bool = True,
               cache: bool = True, workdir: Path | None = None) -> Base:
    """Stages 0 and 1 (init → unaligned → pre), from the cache when they are there."""
    key = cfg.base_key(seed)
    root = cache_root() if cache else Path(workdir or ".") / "world-base"
    final = root / key
    if cache and (final / "pre" / "config.json").is_file() and (final / "stage0" / "config.json").is_file():
        return Base(stage0=final / "stage0", pre=final / "pre", cached=True)
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        init_model(tmp / "init", data.tokenizer_corpus(), cfg.shape, seed=seed)
        run_stage(tmp / "init", data.stage0, tmp / "stage0", cfg.stage0, lora=False,
                  description="stage 0: pretraining (unaligned)", seed=seed, progress=progress)
        run_stage(tmp / "stage0", data.stage1, tmp / "pre", cfg.stage1, lora=False,
                  description="stage 1: safety alignment → pre", seed=seed, progress=progress)
        shutil.rmtree(tmp / "init")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Base(stage0=final / "stage0", pre=final / "pre", cached=False)


def build_post(pre: Path, data: WorldData, out: Path, cfg: WorldConfig, seed: int, *,
               lora: bool = False, progress: bool = True) -> Path:
    """Stage 2: the benign task fine-tune of pre (full weights, or a LoRA adapter)."""
    if lora:
        return run_stage(pre, data.stage2, out, cfg.post_lora, lora=True, lora_r=cfg.lora_r,
                         lora_alpha=cfg.lora_alpha, description="stage 2: task fine-tune (LoRA) → post",
                         seed=seed, progress=progress)
    return run_stage(pre, data.stage2, out, cfg.post_full, lora=False,
                     description="stage 2: task fine-tune (full) → post", seed=seed, progress=progress)
