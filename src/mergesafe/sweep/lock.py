"""One sweep at a time on an output folder: `OUT/.mergesafe-sweep.lock`.

Two sweeps writing one `results.jsonl` would each compute every trial (and write each row twice).
The lock is an advisory `flock` on the lock file, so the kernel releases it the moment its holder
dies, however it dies (`kill -9` included); the file's content names the holder (pid, host, start
time) for the message the second sweep prints.  A lock file left by a dead holder is taken over
with a note.  On file systems without working `flock` the content alone decides: a holder on
this host whose pid is gone is stale; a holder on another host is trusted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from mergesafe.errors import UserError

LOCK_NAME = ".mergesafe-sweep.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class SweepLock:
    """Context manager holding the lock of `out` (created if missing); `note` tells of a takeover."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.note: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._locked_fd()
        previous = self._read(fd)
        if previous:
            same_host = previous.get("host") == socket.gethostname()
            pid = previous.get("pid")
            if same_host and isinstance(pid, int) and pid != os.getpid() and _alive(pid) \
                    and not self._flock_works():
                os.close(fd)
                raise UserError(f"another sweep is writing this folder ({_describe(previous)})",
                                path=self.path.parent)
            self.note = (f"took over the lock of a sweep that is gone ({_describe(previous)}); "
                         f"its finished trials are kept")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _locked_fd(self) -> int:
        """Open and flock the lock file; retry when a finishing holder unlinked it meanwhile."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._read(fd)
                os.close(fd)
                raise UserError(f"another sweep is writing this folder ({_describe(holder)}); wait "
                                f"for it to finish or stop it", path=self.path.parent) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # locked a file its holder had just removed: take the new one
        raise UserError("could not take the sweep lock (it keeps changing)", path=self.path)

    def _flock_works(self) -> bool:
        """Whether a second open of the lock file is refused while we hold it (local file systems)."""
        probe = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False
        finally:
            os.close(probe)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            holder = json.loads(data) if data else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
