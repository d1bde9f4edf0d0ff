"""Running untrusted Python programs (model-written code), one process per program.

Each program runs in ``python -I -S sandbox_child.py`` (isolated mode: no PYTHON* variables, no
site-packages, no user paths), in a new session, with stdin closed, an empty environment, and a
fresh temporary working folder of its own; stdout and stderr go to files outside that folder.
`sandbox_child.py` applies the limits and isolation before the program runs (its docstring
lists them): resource limits (`setrlimit`: address space, CPU seconds, file size, open files, no
core dumps, a process count), a network namespace where the kernel allows it, a fresh user id
when running as root, and an audit hook against writes outside the folder, process creation,
sockets and ctypes.

The parent kills what is left when the program ends or its wall-clock timeout passes: the whole
process group and, as root, every process of the program's user id (``kill(-1)`` as that uid,
repeated until none is left), so forks that left the group die too.

A program passes only when its stdout ends with the run's success marker (a line in its last
4 KiB) and it exits with status 0: a random token, printed by the child after the program returns.  Exiting early (``exit(0)``,
``os._exit(0)``), an exception, a timeout or a limit leaves no marker.

The program's main process also gets SIGKILL when the thread that started it ends
(PR_SET_PDEATHSIG), so a killed evaluation does not leave it running (its forks, if any, are
bounded by RLIMIT_NPROC and RLIMIT_CPU only).

What is NOT isolated: reading files (any file the user may read; as root with the standard library
in a root-only folder, any file at all: the program keeps the read-only capability
CAP_DAC_READ_SEARCH so that imports work); disk use inside its folder (bounded by the timeout
and RLIMIT_FSIZE per file); the network where no namespace could be made
(`RunResult.isolation["network"]` is then False); when not root, forks that leave the process group
(bounded by RLIMIT_NPROC and refused by the audit hook) and writes that bypass the audit hook
(which is a Python-level guard, not a security boundary against deliberately hostile code: run
untrusted models in a container or VM).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("sandbox_child.py")
# Fresh user ids (as root) come from a range no account uses: 2^30 .. 2^31 - 2^20.
_UID_LOW, _UID_SPAN = 1 << 30, (1 << 30) - (1 << 20)


@dataclass(frozen=True)
class Limits:
    """Per-program limits.  `timeout_s` is wall-clock; the CPU limit is ceil(timeout_s) + 1 s."""

    timeout_s: float = 3.0
    memory_bytes: int = 512 << 20
    fsize_bytes: int = 16 << 20
    nofile: int = 64
    nproc: int = 32


@dataclass
class RunResult:
    """The outcome of one program.  `status`: passed | failed | timeout | error."""

    passed: bool
    status: str
    returncode: int | None
    detail: str = ""
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)


def _tail(path: Path, n: int = 4096) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - n))
        return fh.read().decode("utf-8", "replace")


def _error_name(stderr_tail: str) -> str:
    """The exception class of the last traceback line (`AssertionError`), never its message."""
    for line in reversed(stderr_tail.strip().splitlines()):
        head = line.split(":", 1)[0].strip()
        if head and head.replace(".", "").replace("_", "").isalnum() and not line.startswith(" "):
            return head[:80]
    return ""


def _kill_uid(uid: int) -> None:
    """As root: SIGKILL every process of `uid` (a helper that becomes `uid` and calls kill(-1)),
    repeated until none is left (a killed process counts until its zombie is reaped), 10 s at most."""
    # kill(-1) succeeds even when it may signal nobody, so the loop ends on a /proc scan
    code = ("import os, signal, time\nos.setgroups([]); os.setgid({u}); os.setuid({u})\n"
            "def alive():\n"
            "    for p in os.listdir('/proc'):\n"
            "        try:\n"
            "            if p.isdigit() and int(p) != os.getpid() and os.stat('/proc/' + p).st_uid == {u}:\n"
            "                return True\n"
            "        except OSError:\n            pass\n"
            "    return False\n"
            "for _ in range(2000):\n"
            "    try:\n        os.kill(-1, signal.SIGKILL)\n"
            "    except ProcessLookupError:\n        break\n"
            "    if not alive():\n        break\n"
            "    time.sleep(0.005)\n").format(u=uid)
    subprocess.run([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False,
                   env={})


def _kill_group(pgid: int, wait_s: float = 5.0) -> None:
    """SIGKILL the process group, again until it is gone (its forks too), `wait_s` at most."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 9)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


def run_program(source: str, limits: Limits = Limits(), *, uid: int | None = None, audit: bool = True,
                scratch: Path | None = None) -> RunResult:
    """Run one program under the sandbox and report whether it printed the success marker.

    `uid` (root only): the fresh user id to run as (default: a random unused-range id).
    `audit=False` leaves out the audit hook (tests use it to check the OS-level limits alone).
    `scratch`: the private folder that holds the program's folder and output files.
    """
    own_scratch = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="mergesafe-sandbox-")) if scratch is None else scratch
    as_root = os.geteuid() == 0
    if as_root and uid is None:
        uid = _UID_LOW + secrets.randbelow(_UID_SPAN)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    out_path, err_path = work.with_suffix(".out"), work.with_suffix(".err")
    token = secrets.token_hex(16)
    try:
        (work / "program.py").write_text(source, encoding="utf-8")
        if as_root:
            os.chmod(scratch, 0o711)  # the program's uid may enter its folder, not list others
            os.chown(work, uid, uid)
        cfg = {"uid": uid if as_root else None, "nproc": limits.nproc, "memory_bytes": limits.memory_bytes,
               "fsize_bytes": limits.fsize_bytes, "nofile": limits.nofile,
               "cpu_s": int(math.ceil(limits.timeout_s)) + 1, "audit": audit}
        env = {"MERGESAFE_SANDBOX_TOKEN": token, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD), json.dumps(cfg)],
                                    cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid, wait_s=0)
                proc.wait()  # reap it first: a zombie still counts as a process of its uid/group
                _kill_group(proc.pid)  # its pid stays reserved while the group has members
                if as_root and uid is not None:
                    _kill_uid(uid)
        seconds = time.perf_counter() - t0
        with out_path.open("rb") as fh:
            head = fh.readline(4096).decode("utf-8", "replace")
        return _verdict(token, proc.returncode, timed_out, head, _tail(out_path), _tail(err_path), seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for p in (out_path, err_path):
            p.unlink(missing_ok=True)
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _verdict(token: str, rc: int | None, timed_out: bool, head: str, out: str, err: str,
             seconds: float) -> RunResult:
    """`head`: the first line of stdout (the child's isolation header); `out`, `err`: the tails."""
    isolation: dict[str, Any] = {}
    prefix = f"{token}:isolation:"
    if head.startswith(prefix):
        try:
            isolation = json.loads(head[len(prefix):])
        except ValueError:
            pass
    marked = f"{token}:passed" in out.splitlines()  # only the child knows the token
    if timed_out:
        return RunResult(False, "timeout", rc, "timed out", seconds, isolation)
    if marked and rc == 0:
        return RunResult(True, "passed", rc, "", seconds, isolation)
    if not isolation:
        return RunResult(False, "error", rc, f"sandbox did not start: {_error_name(err)}", seconds, isolation)
    if rc is not None and rc < 0:
        detail = {9: "killed", 24: "CPU time limit", 25: "file size limit"}.get(-rc, f"signal {-rc}")
    elif rc == 0:
        detail = "exited before the tests finished"
    else:
        detail = _error_name(err) or f"exit status {rc}"
    return RunResult(False, "failed", rc, detail, seconds, isolation)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), *, workers: int | None = None,
                 audit: bool = True, progress: Callable[[int], None] | None = None) -> list[RunResult]:
    """`run_program` over many programs, `workers` at a time (default: the CPU count).

    As root, each program gets its own fresh user id (distinct within the run).
    """
    if not sources:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources)))
    scratch = Path(tempfile.mkdtemp(prefix="mergesafe-sandbox-"))
    base = _UID_LOW + secrets.randbelow(_UID_SPAN - len(sources))

    def one(i: int) -> RunResult:
        r = run_program(sources[i], limits, uid=base + i, audit=audit, scratch=scratch)
        if progress is not None:
            progress(1)
        return r

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, range(len(sources))))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
