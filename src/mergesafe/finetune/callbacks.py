"""Trainer callbacks: the ``train_log.jsonl`` writer, a rich progress bar, plain log lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from transformers import TrainerCallback


def read_log(path: Path) -> list[dict]:
    """Rows of an existing ``train_log.jsonl`` (empty when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogCallback(TrainerCallback):
    """One row per logging step: ``step``, ``loss``, ``lr``, ``epoch`` and ``val_loss`` where
    measured (a validation at the same step is merged into that step's row).

    On resume the rows after the resumed step are dropped, so the log reads as one run.
    """

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        self.rows = [r for r in read_log(path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.val_history: list[tuple[int, float]] = [
            (r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._flush()  # a resumed run's log starts with the rows up to its checkpoint

    def _row(self, step: int) -> dict:
        if not self.rows or self.rows[-1]["step"] != step:
            self.rows.append({"step": step})
        return self.rows[-1]

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        if "loss" in logs:
            row = self._row(step)
            row.update(loss=float(logs["loss"]), lr=float(logs.get("learning_rate", math.nan)),
                       epoch=round(float(logs.get("epoch", 0.0)), 4))
        elif "eval_loss" in logs:
            self._row(step)["val_loss"] = float(logs["eval_loss"])
            self.val_history.append((step, float(logs["eval_loss"])))
        else:
            return
        self._flush()


class LogLinesCallback(TrainerCallback):
    """One plain line per logging step when the progress bar is off (`finetune --no-progress`):

        step 20/200  loss 1.2345  lr 9.50e-05  tokens/s 1234

    and ``step 40/200  val_loss 1.1000`` for each validation.  Tokens/s counts the non-padding
    input tokens seen since the previous line over the wall time since then."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.last: tuple[float, int] | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        where = f"step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            now, tokens = time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0)
            t_prev, tok_prev = self.last or (now, tokens)
            rate = (tokens - tok_prev) / (now - t_prev) if now > t_prev else float("nan")
            self.last = (now, tokens)
            self._print(f"{where}  loss {float(logs['loss']):.4f}  lr {float(logs.get('learning_rate', math.nan)):.2e}"
                        f"  tokens/s {rate:.0f}")
        elif "eval_loss" in logs:
            self._print(f"{where}  val_loss {float(logs['eval_loss']):.4f}")


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimiser steps, with the last loss and the ETA."""

    def __init__(self, description: str = "fine-tuning") -> None:
        self.description = description
        self.progress = None
        self.task = None
        self.loss = float("nan")
        self.val = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps,
                                           completed=state.global_step, loss="-", val="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")
        if "eval_loss" in logs:
            self.progress.update(self.task, val=f"{logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
