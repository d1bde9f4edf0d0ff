"""Atomic output folders: a result appears complete under its final name, or not at all.

``atomic_output_dir(out, overwrite)`` yields a fresh temporary folder beside ``out`` (same
parent, so the final ``rename`` is atomic on one file system).  On success the folder is renamed
to ``out``; on any exception -- including Ctrl-C (KeyboardInterrupt) and ``kill`` (SIGTERM and
SIGHUP, turned into :class:`Terminated` while the context is active) -- the temporary folder is
removed and ``out`` is left as it was.  An existing non-empty ``out`` is refused with a
:class:`UserError` unless ``overwrite``; with ``overwrite`` the old folder is replaced only once
the new one is complete.  (A SIGKILL cannot be caught: it may leave a hidden
``.<name>.tmp-<pid>-*`` folder beside ``out``, never a partial ``out``.  The next run to the same
``out`` removes the leftovers of runs whose process is gone, with one ``mergesafe: note:`` line
on stderr each; a folder of a run that is still alive is left alone.)

Used by every command that writes a folder (merge, finetune, sweep, demo)::

    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        write_everything_into(tmp)
    # here `out` exists and is complete
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mergesafe.errors import UserError


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM/SIGHUP arrives inside ``atomic_output_dir``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty ``out`` unless ``overwrite``; return the absolute path.

    Call it early (before any long work) to fail fast; ``atomic_output_dir`` checks again.
    """
    out = Path(out).expanduser().absolute()
    for parent in out.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write the output: {parent} is a file, not a folder", out)
            break
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink():
            if any(out.iterdir()) and not overwrite:
                raise UserError("output folder exists and is not empty (pass --overwrite to replace it)",
                                out)
        elif not overwrite:
            raise UserError("output path exists and is not a folder (pass --overwrite to replace it)",
                            out)
    return out


def temp_prefix(out: Path, kind: str = "tmp") -> str:
    """``.<name>.tmp-<pid>-``: the prefix of this process's temporary folders beside ``out``."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: leave its folder alone
    return True


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_temporaries(out: str | Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` folders beside ``out`` left by
    killed runs (their process is gone; folders of the older pid-less naming always count as
    stale), printing one note line for each.  Returns the paths removed."""
    out = Path(out).expanduser().absolute()
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(kinds)})-(?:(\d+)-)?")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or (m.group(2) and int(m.group(2)) == os.getpid()):
            continue
        if m.group(2) and _pid_alive(int(m.group(2))):
            continue
        try:
            size = _size(entry)
        except OSError:
            size = 0
        _remove(entry)
        if not entry.exists():
            removed.append(entry)
            print(f"mergesafe: note: {entry}: removed a temporary folder left by an interrupted "
                  f"run ({size / 1e6:.1f} MB)", file=sys.stderr)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if empty_dir:
            out.rmdir()
        elif not overwrite:
            raise UserError("output folder appeared while writing and is not empty; result discarded",
                            out)
        else:
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
            old.rmdir()
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
            return
    os.replace(tmp, out)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` on success, delete it on error.

    See the module docstring.  Raises :class:`UserError` when ``out`` exists and is not empty
    and ``overwrite`` is false.
    """
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder {out.parent}: {err.strerror or err}",
                        out) from None
    remove_stale_temporaries(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    except OSError as err:  # read-only file system, no permission, no space
        raise UserError(f"cannot create a folder in {out.parent}: {err.strerror or err}",
                        out) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError:
        pass
    try:
        with signals_raise():
            yield tmp
            _commit(tmp, out, overwrite)
    except BaseException:
        with _signals_ignored():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
