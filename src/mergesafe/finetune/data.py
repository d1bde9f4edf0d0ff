"""Loading training rows and turning each one into a conversation or a plain text.

Sources: JSONL, JSON (a list of objects, or JSON Lines), CSV, a `datasets` folder saved with
`save_to_disk`, or an in-memory list of dicts.  Formats, detected per row from its columns
(or forced with `format`):

* ``chat``            -- ``messages``: a list of ``{"role", "content"}``
* ``prompt_response`` -- ``prompt``/``response`` (also ``question``/``answer``)
* ``alpaca``          -- ``instruction``/``output`` with an optional ``input``
* ``text``            -- ``text``: plain text, loss on every token (pre-training style)

Every problem is a `UserError` naming the file and, where there is one, the line or row.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError

FORMATS_EXPECTED = ("messages (chat), prompt/response or question/answer, "
                    "instruction/input/output (alpaca), text")
ROLES = ("system", "user", "assistant", "tool")
IN_MEMORY = "<data>"


@dataclass(frozen=True)
class Example:
    """One training row: either a conversation (`messages`) or a plain `text`."""

    where: str  # "line 3" / "row 3": for error messages
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "chat"


@dataclass
class LoadedData:
    """The examples of one source, with what the manifest needs to know about it."""

    source: str
    examples: list[Example]
    sha256: str
    formats: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"line {lineno}: malformed JSON ({err.msg})", path=path) from None
    return rows


def _read_json(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text)  # JSON Lines saved as .json: report the line
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("expected a JSON list of objects (or one key holding such a list)",
                            path=path)
        data = lists[0]
    if not isinstance(data, list):
        raise UserError("expected a JSON list of objects", path=path)
    return [(f"row {i}", row) for i, row in enumerate(data, start=1)]


def _read_csv(path: Path, text: str) -> list[tuple[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    # Line numbers: header is line 1, so data row i sits on line i + 1 (no multi-line cells).
    return [(f"row {i}", dict(row)) for i, row in enumerate(reader, start=1)]


def _read_folder(path: Path) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise UserError(f"not a dataset folder saved with save_to_disk ({err})", path=path) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"dataset has splits {sorted(ds)} and none is called 'train'", path=path)
    return [(f"row {i}", row) for i, row in enumerate(ds, start=1)]


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _sha256_rows(rows: list[dict]) -> str:
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def read_rows(data: str | Path | list[dict]) -> tuple[str, list[tuple[str, Any]], str]:
    """Return (source name, [(where, row)], sha256) for a path or an in-memory list."""
    if isinstance(data, list):
        return IN_MEMORY, [(f"row {i}", r) for i, r in enumerate(data, start=1)], _sha256_rows(data)
    path = Path(data)
    if not path.exists():
        raise UserError("data file not found", path=path)
    if path.is_dir():
        return str(path), _read_folder(path), _sha256_path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError("data file is not UTF-8 text", path=path) from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text)
    elif suffix == ".json":
        rows = _read_json(path, text)
    else:  # .jsonl, .ndjson, or anything else: JSON Lines
        rows = _read_jsonl(path, text)
    return str(path), rows, _sha256_path(path)


# --------------------------------------------------------------------------- formats


def detect_format(row: dict) -> str | None:
    """The format a row's columns fit, or None."""
    if "messages" in row:
        return "chat"
    if {"instruction", "output"} <= row.keys():
        return "alpaca"
    if {"prompt", "response"} <= row.keys() or {"question", "answer"} <= row.keys():
        return "prompt_response"
    if "text" in row:
        return "text"
    return None


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _to_example(row: dict, fmt: str, where: str, source: str, system_prompt: str | None) -> Example:
    def fail(problem: str) -> UserError:
        return UserError(f"{where}: {problem}", path=source)

    def with_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
        if system_prompt and not any(m["role"] == "system" for m in msgs):
            return [{"role": "system", "content": system_prompt}, *msgs]
        return msgs

    if fmt == "text":
        text = _str(row.get("text"))
        if not text.strip():
            raise fail("empty text")
        return Example(where, text=text)
    if fmt == "chat":
        raw = row.get("messages")
        if isinstance(raw, str):  # CSV cells hold JSON
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise fail("'messages' is not a JSON list") from None
        if not isinstance(raw, list) or not raw:
            raise fail("'messages' must be a non-empty list of {role, content}")
        msgs = []
        for m in raw:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise fail("every message needs 'role' and 'content'")
            role = _str(m["role"])
            if role not in ROLES:
                raise fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            msgs.append({"role": role, "content": _str(m["content"])})
        if not any(m["role"] == "assistant" for m in msgs):
            raise fail("no assistant message to learn from")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            raise fail("empty response (an assistant message has no content)")
        return Example(where, messages=with_system(msgs))
    if fmt == "prompt_response":
        if "prompt" in row or "response" in row:
            prompt, response = _str(row.get("prompt")), _str(row.get("response"))
        else:
            prompt, response = _str(row.get("question")), _str(row.get("answer"))
        if not prompt.strip():
            raise fail("empty prompt")
        if not response.strip():
            raise fail("empty response")
        return Example(where, messages=with_system(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]))
    if fmt == "alpaca":
        instruction, extra, output = (_str(row.get("instruction")), _str(row.get("input")),
                                      _str(row.get("output")))
        if not instruction.strip():
            raise fail("empty instruction")
        if not output.strip():
            raise fail("empty response (empty 'output')")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(where, messages=with_system(
            [{"role": "user", "content": user}, {"role": "assistant", "content": output}]))
    raise ValueError(f"unknown format {fmt!r}")


def _columns(rows: Iterable[tuple[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def load_examples(data: str | Path | list[dict], fmt: str = "auto",
                  system_prompt: str | None = None) -> LoadedData:
    """Read `data` and turn every row into an `Example` (format detected per row on `auto`)."""
    source, rows, sha = read_rows(data)
    if not rows:
        raise UserError("no rows (the data is empty)", path=source)
    examples: list[Example] = []
    counts: dict[str, int] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object, got {type(row).__name__}", path=source)
        row_fmt = detect_format(row) if fmt == "auto" else fmt
        if row_fmt is None or not has_columns(row, row_fmt):
            found = ", ".join(_columns(rows)) if fmt == "auto" else ", ".join(row)
            expected = FORMATS_EXPECTED if fmt == "auto" else f"columns of the {fmt} format"
            raise UserError(f"{where}: no recognisable columns (found: {found}; expected: {expected})",
                            path=source)
        examples.append(_to_example(row, row_fmt, where, source, system_prompt))
        counts[row_fmt] = counts.get(row_fmt, 0) + 1
    return LoadedData(source=source, examples=examples, sha256=sha, formats=counts)


def has_columns(row: dict, fmt: str) -> bool:
    """Whether `row` has the columns that the format `fmt` reads."""
    if fmt == "chat":
        return "messages" in row
    if fmt == "alpaca":
        return {"instruction", "output"} <= row.keys()
    if fmt == "prompt_response":
        return {"prompt", "response"} <= row.keys() or {"question", "answer"} <= row.keys()
    if fmt == "text":
        return "text" in row
    return False
