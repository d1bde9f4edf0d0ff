"""The sweep's progress bar: one bar over all trials, the best merge so far, and what each worker runs."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


class TrialProgress:
    """A rich progress bar over trials (a no-op when disabled)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.workers: dict[int, str] = {}
        self.best = ""
        self.last = ""

    def __enter__(self) -> "TrialProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.progress.start()
            self.task = self.progress.add_task("", total=self.total, completed=self.done)
        return self

    def worker(self, index: int, status: str) -> None:
        """Show what worker `index` is doing (only shown when there is more than one worker)."""
        self.workers[index] = status
        self._refresh(0)

    def advance(self, row: Row, best: str) -> None:
        self.last = f"last: {row['method']} λ={row['weight']:g}"
        self.best = best
        self._refresh(1)

    def _refresh(self, advance: int) -> None:
        if not self.enabled:
            return
        parts = [self.last] if self.last else []
        if self.best:
            parts.append(f"best so far: {self.best}")
        if len(self.workers) > 1:
            parts.append(" ".join(f"[w{i}: {s}]" for i, s in sorted(self.workers.items())))
        self.progress.update(self.task, advance=advance, description=" · ".join(parts))

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()
