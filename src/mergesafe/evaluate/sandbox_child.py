"""The child side of `sandbox.py`: run as a script, ``python -I -S sandbox_child.py CONFIG_JSON``.

It imports nothing from mergesafe (it runs with `-I -S`: no site-packages, no user paths) and,
before any sample code runs:

1. sets the resource limits (address space, CPU seconds, file size, open files, core dumps = 0);
2. leaves the network: a new network namespace (only a loopback that is down) through
   ``unshare(CLONE_NEWNET)`` as root, ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` otherwise; where the
   kernel refuses, the network is not isolated and the header says so;
3. as root: becomes a fresh user id of its own (`uid` in the config, used by no other process)
   with RLIMIT_NPROC, so forks are bounded (root is exempt from RLIMIT_NPROC), files of other
   users cannot be written, and the parent can kill every process of that uid; it keeps
   CAP_DAC_READ_SEARCH (read-only access) only when the Python standard library is not readable
   by other users (e.g. under /root), so that imports work.  Not root: RLIMIT_NPROC = the user's
   current task count + `nproc`;
4. installs an audit hook (PEP 578; it cannot be removed) that refuses: opening a file for
   writing, removing, renaming, linking or changing files outside the working folder; process
   creation (fork, exec, spawn, system, subprocess); kill; sockets; ctypes; chdir;
5. prints a header line ``TOKEN:isolation:{json}`` on stdout.

Then it runs the program (``__name__ == "__main__"``) and, only if it returns, writes the success
marker (``TOKEN:passed``) straight to file descriptor 1.  The token comes from the environment,
which is emptied before the program runs; the program never sees it in its source.  A program
that exits (``exit(0)``, ``os._exit(0)``), raises, or is killed prints no marker.
"""

import builtins
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _set_limits(cfg):
    def lim(which, soft, hard=None):
        hard = soft if hard is None else hard
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
    lim(resource.RLIMIT_NOFILE, cfg["nofile"])
    lim(resource.RLIMIT_AS, cfg["memory_bytes"])
    lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare_net(ctypes, libc, as_root):
    flags = CLONE_NEWNET if as_root else (CLONE_NEWUSER | CLONE_NEWNET)
    if libc.unshare(flags) == 0:
        return True
    return False


def _world_readable(path):
    """Every folder from / to `path` searchable by others, and `path` readable by them."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def _task_count(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return n


def _drop_to(ctypes, libc, uid, nproc, keep_read):
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if keep_read:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    kept = False
    if keep_read:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        bit = 1 << CAP_DAC_READ_SEARCH
        data = (Data * 2)(Data(bit, bit, 0), Data(0, 0, 0))
        kept = libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) == 0
        libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return kept


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_DENIED = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "os.chdir", "os.fchdir", "os.chroot",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.socketpair",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
    "sys.addaudithook", "sys.setprofile", "sys.settrace", "os.setxattr", "os.removexattr",
})
_DENIED_IMPORTS = frozenset({"_ctypes", "ctypes", "_posixsubprocess", "subprocess", "_socket",
                             "socket", "multiprocessing", "_multiprocessing", "pty",
                             # a subinterpreter starts without this interpreter's audit hooks
                             "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
                             "_testinternalcapi", "_testmultiphase", "_testsinglephase"})
# event -> (positions of path arguments checked against the working folder, of dir_fd arguments)
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
    "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
    "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()), "shutil.copytree": ((1,), ()),
}


def _make_hook(root):
    prefix = root.rstrip(os.sep) + os.sep
    realpath, fspath, isinstance_, int_, str_ = os.path.realpath, os.fspath, isinstance, int, str

    def inside(path):
        if isinstance_(path, int_):
            return True  # an open file descriptor: opened through this hook already
        try:
            p = fspath(path)
            if not isinstance_(p, str_):
                p = os.fsdecode(p)
        except Exception:
            return False
        full = realpath(p if p.startswith(os.sep) else os.path.join(root, p))
        return full == root or full.startswith(prefix) or full == "/dev/null"

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {path!r}")
            if mode is None and not isinstance_(path, int_) and os.path.isdir(path) and not inside(path):
                # os.open of a folder gives a dir_fd, which the `open` event cannot see later
                raise PermissionError(f"sandbox: opening a folder outside the working folder: {path!r}")
        elif event in _DENIED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import":
            if args[0] in _DENIED_IMPORTS or args[0].split(".")[0] in _DENIED_IMPORTS:
                raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            for i in paths:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the working folder is not allowed")
            for i in dir_fds:
                if i < len(args) and args[i] is not None and args[i] != -1:
                    raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")

    return hook


def main():
    token = os.environ.pop("MERGESAFE_SANDBOX_TOKEN", "")
    cfg = json.loads(sys.argv[1])
    sys.argv[:] = ["program.py"]
    os.environ.clear()
    root = os.path.realpath(os.getcwd())
    os.environ.update(HOME=root, TMPDIR=root)  # tempfile writes in the working folder
    with open(os.path.join(root, "program.py"), encoding="utf-8") as fh:
        source = fh.read()
    parent = os.getppid()
    as_root = os.geteuid() == 0
    tasks = 0 if as_root else _task_count(os.getuid())  # before a user namespace renames uids
    _set_limits(cfg)
    ctypes, libc = _libc()
    net = _unshare_net(ctypes, libc, as_root)
    isolation = {"network": net, "uid": None, "read_all": False}
    if as_root and cfg.get("uid"):
        keep_read = not _world_readable(os.path.dirname(os.__file__))
        isolation["read_all"] = _drop_to(ctypes, libc, cfg["uid"], cfg["nproc"], keep_read)
        isolation["uid"] = cfg["uid"]
    else:
        n = tasks + cfg["nproc"]
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # die with the parent (set after the uid change, which clears it); it may be gone already
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)
    del libc, ctypes
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    isolation["audit"] = bool(cfg.get("audit", True))
    if isolation["audit"]:
        sys.addaudithook(_make_hook(root))
    builtins.exit = builtins.quit = sys.exit  # as `site` would define them (-S leaves them out)
    os.write(1, f"{token}:isolation:{json.dumps(isolation)}\n".encode())
    scope = {"__name__": "__main__", "__builtins__": builtins, "__file__": "program.py"}
    exec(compile(source, "program.py", "exec"), scope)
    sys.stdout.flush()
    os.write(1, f"\n{token}:passed\n".encode())


if __name__ == "__main__":
    main()
