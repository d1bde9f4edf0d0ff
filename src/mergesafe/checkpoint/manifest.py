"""``mergesafe.json``: what went into an output folder and how it was made.

Schema (version 1)::

    {
      "mergesafe_manifest": 1,
      "kind": "merge",                      # or finetune, sweep, ...
      "created": "2025-01-01T12:00:00+00:00",
      "inputs": {"pre": {"path": "...", "files": {"model.safetensors": "<sha256>", ...}},
                 "post": [{...}, ...]},
      "method": "linear", "params": {...}, "seed": 0,
      "versions": {"mergesafe": ..., "torch": ..., "transformers": ..., "safetensors": ..., ...},
      "timings": {"total_s": 1.23, ...},
      ...                                   # any extra fields the caller adds
    }

Helpers: :func:`sha256_file`, :func:`describe_input` (a file or a folder, hashed),
:class:`BackgroundHasher` (hash large inputs on another thread while the work runs),
:func:`versions`, :func:`write_manifest`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

MANIFEST_NAME = "mergesafe.json"
_CHUNK = 8 * 1024 * 1024


def _sha256_uncached(path: str | Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class HashCache:
    """Digests of files keyed by (path, size, mtime, ctime, inode, device), like git's index.

    Any write to a file changes its mtime/ctime (a replacement changes its inode), so a hit is
    the digest of the current contents.  Stored as JSON in ``$MERGESAFE_CACHE_DIR`` (default
    ``~/.cache/mergesafe``), at most ``MAX_ENTRIES`` files.  ``MERGESAFE_NO_HASH_CACHE=1`` turns it
    off.  Repeated merges of the same inputs (sweeps, benchmarks) then skip re-hashing
    gigabytes of weights.
    """

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        root = os.environ.get("MERGESAFE_CACHE_DIR") or str(Path.home() / ".cache" / "mergesafe")
        self.path = Path(root) / "sha256-v1.json"
        self.enabled = not os.environ.get("MERGESAFE_NO_HASH_CACHE")
        self._lock = threading.Lock()

    @staticmethod
    def _key(st: os.stat_result) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, path: Path) -> str | None:
        if not self.enabled:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        entry = self._load().get(str(path))
        if isinstance(entry, dict) and entry.get("key") == self._key(st):
            return entry.get("sha256")
        return None

    def put(self, items: dict[Path, tuple[os.stat_result, str]]) -> None:
        if not self.enabled or not items:
            return
        with self._lock:
            try:
                data = self._load()
                now = time.time()
                for p, (st, digest) in items.items():
                    data[str(p)] = {"key": self._key(st), "sha256": digest, "used": now}
                if len(data) > self.MAX_ENTRIES:
                    keep = sorted(data.items(), key=lambda kv: -float(kv[1].get("used", 0)))
                    data = dict(keep[: self.MAX_ENTRIES])
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a cache that cannot be written is only a slower cache


def sha256_file(path: str | Path, cache: bool = True) -> str:
    """SHA-256 of a file (8 MiB reads; hashlib releases the GIL).  With ``cache``, a digest
    recorded for the same (size, mtime, ctime, inode) is reused (see :class:`HashCache`)."""
    path = Path(path).absolute()
    hc = HashCache() if cache else None
    if hc is not None and (hit := hc.get(path)):
        return hit
    st = path.stat()
    digest = _sha256_uncached(path)
    if hc is not None and HashCache._key(path.stat()) == HashCache._key(st):
        hc.put({path: (st, digest)})
    return digest


def _files_of(path: Path, files: Iterable[str | Path] | None) -> list[Path]:
    if files is not None:
        return [Path(f) if Path(f).is_absolute() else path / f for f in files]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def describe_input(path: str | Path, files: Iterable[str | Path] | None = None,
                   hashes: dict[Path, str] | None = None) -> dict[str, Any]:
    """``{"path": ..., "sha256": ...}`` for a file, ``{"path": ..., "files": {name: sha256}}`` for
    a folder (``files`` restricts which; default: its top-level, non-hidden files).
    ``hashes`` supplies already computed digests (e.g. from a :class:`BackgroundHasher`)."""
    path = Path(path).expanduser().absolute()
    hashes = hashes or {}
    if path.is_file():
        return {"path": str(path), "sha256": hashes.get(path) or sha256_file(path)}
    out: dict[str, str] = {}
    for f in _files_of(path, files):
        f = f.absolute()
        key = str(f.relative_to(path)) if f.is_relative_to(path) else str(f)
        out[key] = hashes.get(f) or sha256_file(f)
    return {"path": str(path), "files": out}


class BackgroundHasher:
    """Hash files on a worker thread while the main work runs; ``result()`` waits for them.

    Digests found in the :class:`HashCache` are not recomputed; the others are hashed on the
    worker (the SHA work releases the GIL, so it overlaps with a merge) and recorded.
    """

    def __init__(self, paths: Iterable[str | Path], cache: bool = True) -> None:
        self._paths = list(dict.fromkeys(Path(p).absolute() for p in paths))
        self._cache = HashCache() if cache else None
        self._done: dict[Path, str] = {}
        todo = []
        for p in self._paths:
            hit = self._cache.get(p) if self._cache is not None else None
            if hit:
                self._done[p] = hit
            else:
                todo.append(p)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesafe-sha256")
        self._future: Future | None = self._pool.submit(self._work, todo) if todo else None

    def _work(self, todo: list[Path]) -> dict[Path, str]:
        out, fresh = {}, {}
        for p in todo:
            st = p.stat()
            out[p] = _sha256_uncached(p)
            if HashCache._key(p.stat()) == HashCache._key(st):
                fresh[p] = (st, out[p])
        if self._cache is not None:
            self._cache.put(fresh)
        return out

    def result(self) -> dict[Path, str]:
        try:
            if self._future is not None:
                self._done.update(self._future.result())
            return dict(self._done)
        finally:
            self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        if self._future is not None:
            self._future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Versions of mergesafe and its main dependencies (read from metadata, nothing imported)."""
    names = ["mergesafe", "torch", "transformers", "safetensors", "peft", *extra]
    out = {n: _version(n) for n in dict.fromkeys(names)}
    out["python"] = platform.python_version()
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_manifest(folder: str | Path, *, kind: str, inputs: dict[str, Any],
                   method: str | None = None, params: dict | None = None, seed: int | None = None,
                   timings: dict[str, float] | None = None, **extra: Any) -> Path:
    """Write ``folder/mergesafe.json``.  ``inputs`` values may be records from
    :func:`describe_input` (or lists of them), or plain paths (hashed here)."""
    def record(v: Any) -> Any:
        if isinstance(v, (str, Path)):
            return describe_input(v)
        if isinstance(v, (list, tuple)):
            return [record(x) for x in v]
        return v

    data: dict[str, Any] = {
        "mergesafe_manifest": 1,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {k: record(v) for k, v in inputs.items()},
    }
    if method is not None:
        data["method"] = method
    if params is not None:
        data["params"] = params
    if seed is not None:
        data["seed"] = seed
    data["versions"] = versions()
    if timings is not None:
        data["timings"] = {k: round(float(v), 4) for k, v in timings.items()}
    data.update(extra)
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
