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
from pathlib import Path

MAX_PROBLEM = 300
MAX_PATH = 160
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


def one_line(text: str, limit: int) -> str:
    """`text` on one line, cut to `limit` characters (an ellipsis marks the cut)."""
    text = _LINE_BREAKS.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _short_path(path: str) -> str:
    path = _LINE_BREAKS.sub(" ", path)
    if len(path) <= MAX_PATH:
        return path
    head = MAX_PATH // 3
    return path[:head] + "…" + path[-(MAX_PATH - head - 1):]


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        problem = one_line(str(message), MAX_PROBLEM)
        self.problem = problem  # the message without the path
        super().__init__(f"{_short_path(self.path)}: {problem}" if self.path is not None else problem)
