"""The sweep's results file: one JSON row per finished trial, appended at once, keyed by a hash.

Each trial's per-prompt rows (eval's `generations.jsonl` rows) are kept in
`OUT/generations/KEY.jsonl`, written before the trial's row.  A killed sweep resumes by reading `results.jsonl` and skipping every key already there.  The
key hashes the inputs (paths and file fingerprints), the method, its parameters, λ, the seed and
the evaluation settings, so changing any of them starts new keys without losing old rows.  A
file written by an incompatible version is renamed aside (never overwritten) and a new one begun.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_VERSION = 1
RESULTS_NAME = "results.jsonl"
GENERATIONS_DIR = "generations"  # OUT/generations/KEY.jsonl: each trial's eval generations.jsonl rows


def generations_path(out: Path, key: str) -> Path:
    """Where the per-prompt rows (prompt, response, verdict) of the trial `key` are kept."""
    return Path(out) / GENERATIONS_DIR / f"{key}.jsonl"


def write_generations(out: Path, key: str, rows: Iterable[dict[str, Any]]) -> Path:
    """Write a trial's rows atomically (a temporary file beside it, then renamed)."""
    path = generations_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_generations(out: Path, key: str) -> list[dict[str, Any]] | None:
    """A trial's rows, or None when they were not kept (a row of an older version)."""
    path = generations_path(out, key)
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def remove_generations(out: Path) -> None:
    folder = Path(out) / GENERATIONS_DIR
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file():
                f.unlink()
        folder.rmdir()


def trial_key(**parts: Any) -> str:
    """A short stable hash of everything that determines a trial's numbers."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(path: Path) -> dict[str, Any]:
    """Cheap identity of a model folder: every file's name, size and mtime (not its bytes)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path.resolve()),
        "files": [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size,
                   int(p.stat().st_mtime)] for p in files],
    }


class ResultsStore:
    """Append-only `results.jsonl` with resume by key."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / RESULTS_NAME
        self.rows: dict[str, dict[str, Any]] = {}
        self.set_aside: Path | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        rows: list[dict[str, Any]] = []
        compatible = True
        with self.path.open() as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A line cut short by a kill: the trial is simply recomputed.
                    continue
                if not isinstance(row, dict) or row.get("version") != RESULTS_VERSION or "key" not in row:
                    compatible = False
                    break
                rows.append(row)
        if not compatible:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"results.incompatible-{stamp}.jsonl")
            os.replace(self.path, aside)
            self.set_aside = aside
            return
        for row in rows:
            self.rows[row["key"]] = row
        # Rewrite without a torn last line so the file stays valid JSON Lines.
        self._rewrite(self.rows.values())

    def _rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def append(self, row: dict[str, Any]) -> None:
        row = {**row, "version": RESULTS_VERSION}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[row["key"]] = row
