"""Prompt-set loaders: CSV/TSV, JSONL, JSON, plain text (one prompt a line) and `datasets` folders.

Every format becomes a list of `PromptRow`.  The prompt column is detected from common names
(`prompt`, `goal`, `behavior`, `instruction`, `question`, ...; case-insensitive; a file with a
single column uses it) or given explicitly; when none is found the error lists the columns.
A category column (given, or detected from `category`/`semanticcategory`/`type`) gives a
per-category breakdown; a `label` column (XSTest) is kept so that over-refusal can count only
the `safe` rows.  Every problem is a `UserError` naming the file (and line, where there is one).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError

PROMPT_COLUMNS = ("prompt", "goal", "behavior", "instruction", "question", "query", "request",
                  "input", "user", "message", "text", "content")
CATEGORY_COLUMNS = ("category", "semanticcategory", "semantic_category", "type")
REFERENCE_COLUMNS = ("answer", "reference", "target", "label", "output", "solution", "gold",
                     "correct_answer")
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a set, with the fields the metrics need."""

    prompt: str
    line: int
    category: str | None = None
    reference: str | None = None
    label: str | None = None


@dataclass
class PromptSet:
    """A named, loaded prompt set.  `name` is the file stem (the metrics.json key)."""

    name: str
    path: Path
    kind: str  # "safety" | "over_refusal" | "task"
    rows: list[PromptRow]
    scorer: str | None = None


# --------------------------------------------------------------------------- readers

def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError("empty file (no header row)", path=path) from None
        except csv.Error as err:
            raise UserError(f"line 1: malformed CSV ({err})", path=path) from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise UserError(f"duplicate column names in header {header}", path=path)
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise UserError(f"line {reader.line_num}: malformed CSV ({err})", path=path) from None
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise UserError(f"line {reader.line_num}: malformed row: {len(values)} fields, "
                                f"the header has {len(header)}", path=path)
            yield reader.line_num, dict(zip(header, values))


def _as_record(obj: Any, path: Path, where: str) -> dict[str, Any]:
    if isinstance(obj, str):
        return {"prompt": obj}
    if isinstance(obj, dict):
        return obj
    raise UserError(f"{where}: expected an object or a string, got {type(obj).__name__}", path=path)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"line {lineno}: malformed JSON ({err.msg})", path=path) from None
            yield lineno, _as_record(obj, path, f"line {lineno}")


def _read_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"line {err.lineno}: malformed JSON ({err.msg})", path=path) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("expected a JSON list of records (or an object holding exactly one list)",
                            path=path)
        data = lists[0]
    if not isinstance(data, list):
        raise UserError("expected a JSON list of records", path=path)
    for i, obj in enumerate(data, start=1):
        yield i, _as_record(obj, path, f"record {i}")


def _read_txt(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield lineno, {"prompt": text}


def _read_datasets_dir(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
        raise UserError(f"not a `datasets` folder saved with save_to_disk ({err})", path=path) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "test" in ds:
            ds = ds["test"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise UserError(f"a DatasetDict with splits {splits} and no 'test' split; "
                            "save the split to use", path=path)
    for i, record in enumerate(ds, start=1):
        yield i, dict(record)


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line or record number, record)` from any supported format."""
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path=path)
    if path.is_dir():
        return _read_datasets_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, ",")
    if suffix == ".tsv":
        return _read_csv(path, "\t")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".txt":
        return _read_txt(path)
    raise UserError(f"unknown prompt-set format {suffix!r} (use .csv, .tsv, .jsonl, .json, .txt "
                    "or a `datasets` folder)", path=path)


# --------------------------------------------------------------------------- columns

def _find_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str],
                 path: Path, what: str, required: bool) -> str | None:
    by_lower = {c.lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise UserError(f"no {what} column {wanted!r}; the columns are {list(columns)}", path=path)
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    if required:
        raise UserError(f"no {what} column found; the columns are {list(columns)} "
                        f"(choose one with --{what}-column)", path=path)
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def load_prompt_file(path: str | Path, *, prompt_column: str | None = None,
                     category_column: str | None = None, reference_column: str | None = None,
                     require_reference: bool = False) -> list[PromptRow]:
    """Read one prompt set into `PromptRow`s (all rows, before any limit or filter)."""
    path = Path(path)
    records = list(read_records(path))
    if not records:
        raise UserError("empty prompt set (no rows)", path=path)
    columns = list(records[0][1].keys())
    single = [columns[0]] if len(columns) == 1 else []
    p_col = _find_column(columns, prompt_column, [*PROMPT_COLUMNS, *(c.lower() for c in single)],
                         path, "prompt", required=True)
    c_col = _find_column(columns, category_column, CATEGORY_COLUMNS, path, "category", required=False)
    r_col = None
    if require_reference or reference_column is not None:
        r_col = _find_column(columns, reference_column,
                             [c for c in REFERENCE_COLUMNS if c.lower() != p_col.lower()],
                             path, "reference", required=require_reference)
    l_col = next((c for c in columns if c.lower() == LABEL_COLUMN and c not in (p_col, r_col)), None)

    rows: list[PromptRow] = []
    for line, rec in records:
        if p_col not in rec:
            raise UserError(f"line {line}: no {p_col!r} field", path=path)
        prompt = _text(rec[p_col])
        if prompt is None or not prompt.strip():
            raise UserError(f"line {line}: empty prompt", path=path)
        reference = _text(rec.get(r_col)) if r_col else None
        if require_reference and (reference is None or not reference.strip()):
            raise UserError(f"line {line}: task row without a reference ({r_col!r} is missing or empty)",
                            path=path)
        category = _text(rec.get(c_col)) if c_col else None
        label = _text(rec.get(l_col)) if l_col else None
        rows.append(PromptRow(prompt=prompt, line=line, category=category or None,
                              reference=reference, label=label))
    return rows


def select_rows(rows: list[PromptRow], *, limit: int | None = None, sample: int | None = None,
                seed: int = 0) -> list[PromptRow]:
    """`sample` draws N rows at random (seeded; kept in file order), then `limit` keeps the first N."""
    if sample is not None and sample < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    if limit is not None:
        rows = rows[:limit]
    return rows


def safe_rows_only(rows: list[PromptRow]) -> list[PromptRow]:
    """XSTest-style sets: where a label column exists, only `safe` rows are benign prompts."""
    if any(r.label is not None for r in rows):
        return [r for r in rows if (r.label or "").strip().lower() == "safe"]
    return rows
