"""The one exception type for bad input.

Anything the user can fix (a missing file, a malformed row, an unknown method, ...) is
raised as `UserError("<file or tensor>: <problem>")`.  The command line prints it as one
line on stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)
