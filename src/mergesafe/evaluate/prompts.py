"""Prompt-set loaders: CSV/TSV, JSONL, JSON, plain text (one prompt a line) and `datasets` folders.

Every format becomes a list of `PromptRow`.  The prompt column is detected from common names
(`prompt`, `goal`, `behavior`, `instruction`, `question`, ...; case-insensitive; a file with a
single column uses it) or given explicitly; when none is found the error lists the columns.
A category column (given, or detected from `category`/`semanticcategory`/`type`) gives a
per-category breakdown; a `label` column (XSTest) is kept so that over-refusal can count only
the `safe` rows.  Every problem is a `UserError` naming the file (and line, where there is one).

A folder of category files (HEx-PHI's layout: `category_1.csv` ... `category_11.csv`, one prompt
per line, no header, CSV-quoted where a prompt holds a comma or a quote) is one set: each `.csv`
file is a category named by its stem; files are read in natural order (`category_2` before
`category_10`).  A row's `line` is its line in the concatenation of the files in that order (what
`cat` of the sorted files would number), so it is unique within the set; errors name the
category file and the line within it.  A folder holding `dataset_info.json`, `state.json` or
`dataset_dict.json` is a `datasets` folder instead.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError, echo

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
    # The row's other fields a scorer asks for (its REQUIRED_FIELDS, e.g. humaneval's task_id,
    # prompt, test, entry_point); None for sets whose scorer asks for none (memory stays low).
    fields: dict[str, Any] | None = None


@dataclass
class PromptSet:
    """A named, loaded prompt set.  `name` is the file stem (the metrics.json key)."""

    name: str
    path: Path
    kind: str  # "safety" | "over_refusal" | "task"
    rows: list[PromptRow]
    scorer: str | None = None
    # Responses per row: `EvalConfig.num_samples` for task sets, 1 for the others.  A set's
    # responses are a flat list of len(rows) * samples, row-major (row i: [i*samples, (i+1)*samples)).
    samples: int = 1


# --------------------------------------------------------------------------- readers

MAX_LINE_CHARS = 16 << 20  # one line of a CSV/TSV/JSONL/TXT file
MAX_JSON_BYTES = 512 << 20  # a .json file is parsed whole; JSON Lines are streamed


def _lines(fh, path: Path) -> Iterator[str]:
    """The lines of a text file, each read with a bound (a longer line is refused, not read)."""
    lineno = 0
    while True:
        line = fh.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise UserError(f"line {lineno}: longer than {MAX_LINE_CHARS} characters", path=path)
        yield line


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(_lines(fh, path), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError("empty file (no header row)", path=path) from None
        except csv.Error as err:
            raise UserError(f"line 1: malformed CSV ({err})", path=path) from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise UserError(f"duplicate column names in header {echo(header, 160)}", path=path)
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
        for lineno, line in enumerate(_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"line {lineno}: malformed JSON ({err.msg})", path=path) from None
            except ValueError as err:  # an integer of over 4300 digits
                raise UserError(f"line {lineno}: malformed JSON ({str(err)[:100]})", path=path) from None
            except RecursionError:
                raise UserError(f"line {lineno}: JSON nested too deeply", path=path) from None
            yield lineno, _as_record(obj, path, f"line {lineno}")


def _read_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UserError(f"JSON file too large to parse whole ({size >> 20} MB; at most "
                        f"{MAX_JSON_BYTES >> 20} MB): save it as JSON Lines (.jsonl), which is streamed",
                        path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"line {err.lineno}: malformed JSON ({err.msg})", path=path) from None
    except UnicodeDecodeError:
        raise
    except ValueError as err:  # an integer of over 4300 digits
        raise UserError(f"malformed JSON ({str(err)[:100]})", path=path) from None
    except RecursionError:
        raise UserError("JSON nested too deeply", path=path) from None
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
        for lineno, line in enumerate(_lines(fh, path), start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield lineno, {"prompt": text}


def _first_bad_utf8_line(path: Path) -> int:
    """The line of the first byte that is not UTF-8 (streamed; only called after a decode error)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return line + chunk[:max(0, err.start)].count(b"\n")
            line += chunk.count(b"\n")
    return line


def _utf8_checked(path: Path, records: Iterator[tuple[int, dict[str, Any]]]
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from records
    except UnicodeDecodeError:
        raise UserError(f"line {_first_bad_utf8_line(path)}: not UTF-8 text (save the file as UTF-8)",
                        path=path) from None


def _read_datasets_dir(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
        raise UserError(f"not a `datasets` folder saved with save_to_disk ({echo(str(err), 100)})",
                        path=path) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "test" in ds:
            ds = ds["test"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise UserError(f"a DatasetDict with splits {echo(splits, 160)} and no 'test' split; "
                            "save the split to use", path=path)
    for i, record in enumerate(ds, start=1):
        yield i, dict(record)


DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _natural_key(path: Path) -> tuple[list[int | str], str]:
    """`category_2` before `category_10`: digit runs compare as numbers (str and int alternate)."""
    parts = re.split(r"(\d+)", path.stem)
    return [int(x) if i % 2 else x.casefold() for i, x in enumerate(parts)], path.name


def category_files(path: Path) -> list[Path]:
    """The `.csv` files of a folder of category files, in natural order; [] for a `datasets` folder."""
    if any((path / m).exists() for m in DATASETS_MARKERS):
        return []
    return sorted((p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file()),
                  key=_natural_key)


def _read_headerless_csv(path: Path, counted: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """One prompt per CSV record, no header: `(first line of the record, {"prompt": text})`.

    A record that parses to several fields (an unquoted comma) is taken as its raw text.  When the
    file is exhausted, `counted` receives its number of physical lines.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        raw: list[str] = []

        def feed() -> Iterator[str]:
            for line in _lines(fh, path):
                raw.append(line)
                yield line

        reader = csv.reader(feed())
        while True:
            raw.clear()
            try:
                values = next(reader)
            except StopIteration:
                counted.append(reader.line_num)
                return
            except csv.Error as err:
                raise UserError(f"line {reader.line_num}: malformed CSV ({err})", path=path) from None
            if not values or all(not v.strip() for v in values):
                continue
            text = values[0] if len(values) == 1 else "".join(raw).rstrip("\r\n")
            yield reader.line_num - len(raw) + 1, {"prompt": text}


def _read_category_folder(files: list[Path]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of every category file; `line` runs on across the files (see the module docstring)."""
    offset = 0
    for f in files:
        counted: list[int] = []
        for line, rec in _utf8_checked(f, _read_headerless_csv(f, counted)):
            rec["category"] = f.stem
            yield offset + line, rec
        offset += counted[0] if counted else 0


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line or record number, record)` from any supported format."""
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path=path)
    if path.is_dir():
        files = category_files(path)
        return _read_category_folder(files) if files else _read_datasets_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _utf8_checked(path, _read_csv(path, ","))
    if suffix == ".tsv":
        return _utf8_checked(path, _read_csv(path, "\t"))
    if suffix in (".jsonl", ".ndjson"):
        return _utf8_checked(path, _read_jsonl(path))
    if suffix == ".json":
        return _utf8_checked(path, _read_json(path))
    if suffix == ".txt":
        return _utf8_checked(path, _read_txt(path))
    raise UserError(f"unknown prompt-set format {echo(suffix, 160)} (use .csv, .tsv, .jsonl, .json, .txt "
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
        raise UserError(f"no {what} column {echo(wanted, 160)}; the columns are {echo(list(columns), 160)}",
                        path=path)
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    if required:
        raise UserError(f"no {what} column found; the columns are {echo(list(columns), 160)} "
                        f"(choose one with --{what}-column)", path=path)
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def iter_prompt_rows(path: str | Path, *, prompt_column: str | None = None,
                     category_column: str | None = None, reference_column: str | None = None,
                     require_reference: bool = False, fields: Sequence[str] = ()) -> Iterator[PromptRow]:
    """Stream the `PromptRow`s of one prompt set, checking each row as it is read.

    Columns are detected from the first record.  Nothing is read before the first `next()`.
    """
    _, rows = _open_rows(Path(path), prompt_column, category_column, reference_column,
                         require_reference, fields)
    yield from rows


def _open_rows(path: Path, prompt_column: str | None, category_column: str | None,
               reference_column: str | None, require_reference: bool, fields: Sequence[str] = ()
               ) -> tuple[bool, Iterator[PromptRow]]:
    """(whether the set has a label column, its rows): reads the first record now."""
    records = iter(read_records(path))
    first = next(records, None)
    if first is None:
        raise UserError("empty prompt set (no rows)", path=path)
    columns = list(first[1].keys())
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
    return l_col is not None, _rows(path, itertools.chain([first], records), p_col, c_col, r_col,
                                    l_col, require_reference, tuple(fields))


def _rows(path: Path, records: Iterator[tuple[int, dict[str, Any]]], p_col: str, c_col: str | None,
          r_col: str | None, l_col: str | None, require_reference: bool,
          fields: tuple[str, ...] = ()) -> Iterator[PromptRow]:
    for line, rec in records:
        for f in fields:  # the scorer's required fields: present and not empty
            if rec.get(f) is None or (isinstance(rec[f], str) and not rec[f].strip()):
                raise UserError(f"line {line}: no {echo(f, 160)} field (the scorer needs "
                                f"{', '.join(fields)})", path=path)
        if p_col not in rec:
            raise UserError(f"line {line}: no {echo(p_col, 160)} field", path=path)
        prompt = _text(rec[p_col])
        if prompt is None or not prompt.strip():
            raise UserError(f"line {line}: empty prompt", path=path)
        reference = _text(rec.get(r_col)) if r_col else None
        if require_reference and (reference is None or not reference.strip()):
            raise UserError(f"line {line}: task row without a reference ({echo(r_col, 160)} is missing or empty)",
                            path=path)
        category = _text(rec.get(c_col)) if c_col else None
        label = _text(rec.get(l_col)) if l_col else None
        yield PromptRow(prompt=prompt, line=line, category=category or None, reference=reference,
                        label=label, fields={f: rec[f] for f in fields} if fields else None)


def load_prompt_file(path: str | Path, *, prompt_column: str | None = None,
                     category_column: str | None = None, reference_column: str | None = None,
                     require_reference: bool = False, limit: int | None = None,
                     sample: int | None = None, seed: int = 0, safe_only: bool = False,
                     fields: Sequence[str] = ()) -> list[PromptRow]:
    """Read one prompt set into `PromptRow`s.

    Without `limit`, `sample` and `safe_only`: every row (each one checked).  With them, the result
    is exactly `select_rows(safe_rows_only(rows) if safe_only else rows, limit=, sample=, seed=)`,
    but the file is streamed: with `limit` and no `sample`, reading stops once `limit` rows are
    kept (rows after them are not read, nor checked); with `sample`, a first pass counts (and
    checks) the rows and a second one picks the drawn ones, so memory holds only those.  Applying
    `select_rows`/`safe_rows_only` again to the result changes nothing.
    """
    path = Path(path)
    columns = (prompt_column, category_column, reference_column, require_reference, tuple(fields))
    has_label, rows = _open_rows(path, *columns)
    safe_only = safe_only and has_label  # without a label column every row is kept
    if sample is None:
        return _first_rows(rows, limit, safe_only)
    n_all = n_safe = 0
    any_label = False
    for row in rows:
        n_all += 1
        any_label = any_label or row.label is not None
        n_safe += _is_safe(row)
    only_safe = safe_only and any_label
    n = n_safe if only_safe else n_all
    if sample >= n:
        return _first_rows(_open_rows(path, *columns)[1], limit, safe_only)
    keep = sorted(random.Random(seed).sample(range(n), sample))  # as select_rows draws them
    if limit is not None:
        keep = keep[:limit]
    wanted, last = set(keep), keep[-1] if keep else -1
    picked: list[PromptRow] = []
    index = -1
    for row in _open_rows(path, *columns)[1]:
        if only_safe and not _is_safe(row):
            continue
        index += 1
        if index in wanted:
            picked.append(row)
        if index >= last:
            break
    return picked


def _is_safe(row: PromptRow) -> bool:
    return (row.label or "").strip().lower() == "safe"


def _first_rows(rows: Iterator[PromptRow], limit: int | None, safe_only: bool) -> list[PromptRow]:
    """The first `limit` rows (of the `safe` ones when `safe_only`, as `safe_rows_only` keeps them),
    reading no further than needed."""
    if limit is not None and limit <= 0:
        return []
    kept: list[PromptRow] = []
    unlabeled: list[PromptRow] = []  # safe_only: all rows, while no row has had a label
    any_label = False
    for row in rows:
        if not safe_only:
            kept.append(row)
        else:
            if row.label is not None and not any_label:
                any_label, unlabeled = True, []
            if _is_safe(row):
                kept.append(row)
            elif not any_label and (limit is None or len(unlabeled) < limit):
                unlabeled.append(row)
        if limit is not None and len(kept) >= limit and (not safe_only or any_label):
            break
    if safe_only and not any_label:
        kept = unlabeled
    return kept[:limit] if limit is not None else kept


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
