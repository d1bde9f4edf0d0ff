"""Writing an evaluation folder atomically: `metrics.json`, `generations.jsonl`, `mergesafe.json`.

Everything is written into a temporary folder beside the target, then renamed into place, so an
interrupted run never leaves a half-written folder and never destroys an earlier result.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergesafe.checkpoint.atomic import atomic_output_dir, check_output_dir
from mergesafe.errors import UserError


def jsonable(obj: Any) -> Any:
    """NaN/inf (an undefined rate, e.g. every verdict unparsed) become JSON `null`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before any work when the output folder exists and may not be replaced, or cannot be
    made (a parent is a file)."""
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a folder", path=out)
    check_output_dir(out, overwrite)


def sha256_path(path: Path) -> str | None:
    """sha256 of a file (None for a folder)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_eval_dir(out: Path, metrics: dict, rows: Iterable[dict], manifest: dict,
                   overwrite: bool = False) -> Path:
    """Write the three files of an evaluation folder, atomically."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n",
                                          encoding="utf-8")
        with (tmp / "generations.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
        (tmp / "mergesafe.json").write_text(json.dumps(jsonable(manifest), indent=2) + "\n",
                                            encoding="utf-8")
    return Path(out)
