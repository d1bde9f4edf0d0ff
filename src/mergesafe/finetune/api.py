"""`finetune(...)`: supervised fine-tuning of a chat model, LoRA or full, into a post model.

Steps: check OUT (nothing is created when the input is bad) → read and validate the data →
tokenizer and chat template → tokenize with assistant-only labels → validation split → train
in ``OUT.partial`` (checkpoints there, resumable) → save model, tokenizer, ``train_log.jsonl``
and the ``mergesafe.json`` manifest → rename ``OUT.partial`` to OUT.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergesafe.errors import UserError
from mergesafe.finetune import workdir
from mergesafe.finetune.config import FinetuneConfig
from mergesafe.finetune.data import load_examples
from mergesafe.finetune.tokenize import load_tokenizer, tokenize_examples

log = logging.getLogger(__name__)
MANIFEST = "mergesafe.json"


def make_config(config: FinetuneConfig | None = None, **overrides: Any) -> FinetuneConfig:
    """`config` (or the defaults) with `overrides` applied and validated."""
    base = (config or FinetuneConfig()).model_dump()
    try:
        return FinetuneConfig(**{**base, **overrides})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                             for e in err.errors())
        raise UserError(f"invalid fine-tuning settings: {problems}") from None


def split_rows(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `val_size` of the rows (a fraction < 1, or a count >= 1), shuffled by `seed`."""
    n = len(rows)
    if val_size <= 0 or n < 2:
        return list(rows), []
    n_val = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    n_val = min(n_val, n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val_idx],
            [r for i, r in enumerate(rows) if i in val_idx])


def _check_out_apart(out: Path, *inputs: Any) -> None:
    """Refuse an OUT (or its OUT.partial) that is an input, holds one or lies inside one: the
    run would replace or write into it.  Paths are compared resolved (``..``, symlinks)."""
    from mergesafe.checkpoint.inputs import check_not_input

    paths = [p for p in inputs if isinstance(p, (str, Path))]
    check_not_input(out, paths)
    check_not_input(workdir.work_dir_for(out), paths)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("mergesafe", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def finetune(model: str | Path, data: str | Path | list[dict], out: str | Path,
             config: FinetuneConfig | None = None, *, callbacks: list[Any] | None = None,
             **overrides: Any) -> Path:
    """Fine-tune `model` on `data` and write the post model to `out`; returns `out`.

    `data` is a JSONL/JSON/CSV file, a `datasets` folder, or a list of row dicts (chat,
    prompt/response, Alpaca or plain-text rows, detected per row unless ``format`` is set).
    `overrides` are `FinetuneConfig` fields (``lora=False``, ``max_steps=60``, ...).
    `callbacks` are extra `transformers.TrainerCallback`s.  ``ema=β`` also keeps an EMA of the
    trained parameters in parameter space and writes it to ``OUT/ema`` (see
    :mod:`mergesafe.finetune.ema`).  Raises `UserError` on bad input before anything is written.
    """
    cfg = make_config(config, **overrides)
    model, out = Path(model), Path(out)
    started = datetime.now(UTC)
    t0 = time.perf_counter()

    # 1. everything that can be wrong with the input, before anything is written
    _check_out_apart(out, model, data, cfg.chat_template)
    workdir.check_out(out, overwrite=cfg.overwrite, resume=cfg.resume)
    from mergesafe.checkpoint.inputs import open_model, refuse_remote_code

    refuse_remote_code(model)  # before transformers reads the folder: it would offer to run the code
    loaded = load_examples(data, cfg.format, cfg.system_prompt)
    need_template = any(ex.kind == "chat" for ex in loaded.examples)
    tok = load_tokenizer(model, cfg.chat_template, need_template=need_template)
    if not (model / "config.json").is_file():
        raise UserError("no config.json in the model folder", path=model)
    # the weights: every header and shard validated, .bin only with allow_pickle (the trainer
    # loads them after OUT.partial exists; a bad checkpoint is refused before that)
    open_model(model, "--model", allow_pickle=cfg.allow_pickle).close()
    tokenized = tokenize_examples(tok, loaded.examples, cfg.max_length, loaded.source)
    if not tokenized.rows:
        raise UserError(f"no row has answer tokens within max_length={cfg.max_length}",
                        path=loaded.source)
    train_rows, val_rows = split_rows(tokenized.rows, cfg.val_size, cfg.seed)
    if cfg.ema is not None and cfg.resume:  # the checkpoint workdir.prepare would resume from
        from mergesafe.finetune.ema import check_resumable

        found = workdir.checkpoints(workdir.work_dir_for(out)) or workdir.checkpoints(out)
        check_resumable(found[-1] if found else None)

    # 2. train in OUT.partial (under `accelerate launch`, the main process owns the folders)
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # every process has checked OUT before the work folder appears
    created = workdir.missing_parents(out)
    try:
        return _train_and_save(model, out, cfg, state, loaded, tok, tokenized, train_rows, val_rows,
                               callbacks, started, t0)
    except BaseException:
        # nothing to resume from: no empty or half-written OUT.partial may stay behind
        if state.is_main_process:
            workdir.discard(out, created)
        raise


def _train_and_save(model: Path, out: Path, cfg: FinetuneConfig, state, loaded, tok, tokenized,
                    train_rows: list[dict], val_rows: list[dict], callbacks: list[Any] | None,
                    started: datetime, t0: float) -> Path:
    """Steps 2 and 3 of `finetune`: train in OUT.partial, save, write the manifest, rename."""
    from mergesafe.finetune.trainer import save_model, train

    if state.is_main_process:
        work, resume_from = workdir.prepare(out, overwrite=cfg.overwrite, resume=cfg.resume)
    state.wait_for_everyone()
    if not state.is_main_process:
        work = workdir.work_dir_for(out)
        resume_from = workdir.checkpoints(work)[-1] if cfg.resume and workdir.checkpoints(work) else None
    if cfg.resume and resume_from is None:
        log.info("%s: nothing to resume, starting from scratch", out)
    ema_cb = None
    if cfg.ema is not None:  # EMA in parameter space, written to OUT/ema (see finetune/ema.py)
        from mergesafe.finetune.ema import EmaCallback

        ema_cb = EmaCallback(cfg.ema)
        callbacks = [ema_cb, *(callbacks or [])]
    trainer, result, saved_dtype = train(model, tok, train_rows, val_rows, cfg, work, resume_from,
                                         callbacks)

    # 3. save and move into place
    if ema_cb is None:
        kind = save_model(trainer, tok, cfg, work, saved_dtype)
    else:
        from mergesafe.finetune.ema import save_with_ema

        kind = save_with_ema(trainer, tok, cfg, work, saved_dtype, ema_cb, model)
    if state.is_main_process:
        manifest = {
            "tool": "mergesafe finetune",
            "kind": kind,
            "model": {"path": str(model.resolve())},
            "data": {
                "source": loaded.source if loaded.source == "<data>" else str(Path(loaded.source).resolve()),
                "sha256": loaded.sha256,
                "rows": len(loaded.examples),
                "formats": loaded.formats,
                "train_rows": len(train_rows),
                "val_rows": len(val_rows),
                "truncated_rows": tokenized.truncated,
                "dropped_rows": tokenized.dropped,
                "tokens": tokenized.tokens,
                "answer_tokens": tokenized.label_tokens,
            },
            "config": cfg.to_manifest(),
            "seed": cfg.seed,
            "training": {
                "global_step": result.global_step,
                "epoch": result.epoch,
                "resumed_from_step": result.resumed_from_step,
                "train_loss": result.train_loss,
                "val_losses": [{"step": s, "val_loss": v} for s, v in result.val_losses],
                "tokens_seen": result.tokens_seen,
                "train_runtime_s": round(result.runtime_s, 3),
                "tokens_per_s": round(result.tokens_per_s, 1),
                "precision": result.precision,
                "device": result.device,
                "trainable_params": result.trainable_params,
                "total_params": result.total_params,
                "checkpoints": [p.name for p in workdir.checkpoints(work)],
            },
            **({"ema": {"beta": cfg.ema, "path": "ema", "steps": ema_cb.steps}}
               if ema_cb is not None else {}),
            "versions": _versions(),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        workdir.finish(work, out)
    state.wait_for_everyone()
    return out
