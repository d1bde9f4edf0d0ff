"""The one exception type for bad input.

Anything the user can fix (a missing file, a malformed row, an unknown method, ...) is
raised as `UserError("<file or tensor>: <problem>")`.  The command line prints it as one
line on stderr and exits with code 2, without a traceback.

Whatever a caller puts in it (a value echoed from a hostile file, a path of any length), the
message is one line of bounded length: line breaks of every kind become spaces, the problem is
cut at `MAX_PROBLEM` characters and the path at `MAX_PATH` (keeping its start and its end).
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

MAX_PROBLEM = 300
MAX_PATH = 160
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 100
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3


def one_line(text: str, limit: int) -> str:
    """`text` on one line, cut to `limit` characters ("..." marks the cut)."""
    text = _LINE_BREAKS.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def echo(value: Any, limit: int = 100) -> str:
    """A user value (from a file, a flag) quoted in a message: its repr, bounded however long or
    deeply nested the value is, on one line of at most `limit` characters."""
    try:
        text = _REPR.repr(value)
    except (RecursionError, ValueError):  # nested too deeply, an int too long to print
        text = f"<{type(value).__name__}>"
    return one_line(text, limit)


def short_path(path: str | Path, limit: int = MAX_PATH) -> str:
    """A path for a message: its start and its end when it is longer than `limit`."""
    text = _LINE_BREAKS.sub(" ", str(path))
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + "..." + text[-(limit - head - 3):]


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        problem = one_line(str(message), MAX_PROBLEM)
        self.problem = problem  # the message without the path
        super().__init__(f"{short_path(self.path)}: {problem}" if self.path is not None else problem)
