"""The hardening catalogue (issue 16): every case an outside probe found, run through the command
line in-process, each against the same contract.

* bad input: exit 2 and exactly one stderr line, ``mergesafe: error: <path>: <message>``
  (no traceback, no other line);
* the warning case (18): exit 0 and exactly one ``mergesafe: warning: ...`` line; the note case
  (16): exit 0 and exactly one note line;
* nothing is modified: every input folder and file the case uses is hashed (sha256 of every
  file, recursively) before and after; for an error the output area is left exactly as it was
  (no OUT, no ``OUT.partial``, no ``.OUT.tmp-*`` / ``.OUT.old-*`` folder), and the shared inputs
  of the module are checked by name, size and mtime.

Cases that could run away when unfixed (alias bomb, huge λ grid, template loops) run under a
time and address-space budget, so an unfixed build fails the test instead of the machine; an
``out of memory`` line does not count as a refusal there.  Disk full and read-only file systems
are simulated by wrapping ``open``/``mkdir`` for one folder (CI runs as root, which permission
bits do not stop).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import resource
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cli_helpers import leftovers, run_cli

GIB = 1 << 30


# ===================================================================== helpers

def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), symlinks by target, folders by name."""
    root = Path(root)
    if root.is_symlink():
        return {".": "link:" + os.readlink(root)}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.exists():
        return {}
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:
            p = base / name
            out[str(p.relative_to(root))] = "link:" + os.readlink(p) if p.is_symlink() else "dir"
        for name in filenames:
            p = base / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                h = hashlib.sha256()
                with builtins.open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = h.hexdigest()
    return out


def tree_stat(root: Path) -> dict[str, tuple[int, int]]:
    """Name → (size, mtime_ns) of everything under `root`: a cheap backstop for the shared inputs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added[:10]}, removed {removed[:10]}, changed {changed[:10]}"


class Overrun(BaseException):
    """The command ran past its time budget (not an Exception, so nothing in the tool catches it)."""


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def budget(seconds: float, extra_memory: int) -> Iterator[None]:
    """Raise `Overrun` after `seconds`; let the address space grow by at most `extra_memory`."""
    def alarm(signum, frame):
        raise Overrun(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_size()
    if vm:
        limit = vm + extra_memory
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------- simulated file systems

class _FullFile:
    """A file on a full disk: writes succeed until the disk's bytes run out, then ENOSPC."""

    def __init__(self, fh, disk: dict) -> None:
        self._fh = fh
        self._disk = disk

    def write(self, data):
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk["left"]:
            self._disk["left"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
        self._disk["left"] -= n
        return self._fh.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False

    def __iter__(self):
        return iter(self._fh)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _inside(path, root: str) -> bool:
    try:
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
    except TypeError:
        return False
    return p == root or p.startswith(root + os.sep)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


@contextmanager
def full_disk(monkeypatch, root: Path, size: int) -> Iterator[None]:
    """Files opened for writing under `root` share `size` bytes; then write() fails with ENOSPC."""
    root_s = os.path.abspath(root)
    real_open = builtins.open
    disk = {"left": size}

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _FullFile(fh, disk) if _writes(mode) and _inside(file, root_s) else fh

    with monkeypatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        yield


@contextmanager
def read_only(monkeypatch, root: Path) -> Iterator[None]:
    """Under `root` nothing can be created, written, renamed or removed: EROFS."""
    root_s = os.path.abspath(root)
    real = {name: getattr(os, name) for name in ("mkdir", "open", "replace", "rename", "unlink",
                                                  "remove", "rmdir")}
    real_open = builtins.open

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(path)))

    def guard(name, nargs=1):
        def wrapped(*args, **kwargs):
            if "dir_fd" not in kwargs and any(_inside(a, root_s) for a in args[:nargs]):
                refuse(next(a for a in args[:nargs] if _inside(a, root_s)))
            return real[name](*args, **kwargs)
        return wrapped

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, root_s):
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def fake_open(file, mode="r", *args, **kwargs):
        if _writes(mode) and _inside(file, root_s):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as mp:
        for name in ("mkdir", "unlink", "remove", "rmdir"):
            mp.setattr(os, name, guard(name))
        for name in ("replace", "rename"):
            mp.setattr(os, name, guard(name, 2))
        mp.setattr(os, "open", os_open)
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        yield


# ---------------------------------------------------------------- safetensors surgery

def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def point_shard_at(folder: Path, shard: Path, target: str) -> None:
    """Make the index send every tensor of `shard` to `target` (a path outside the folder)."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (target if v == shard.name else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


# ===================================================================== the inputs

CUSTOM_CODE = '''\
import os
import pathlib

pathlib.Path(os.environ.get("MERGESAFE_CATALOGUE_MARKER", os.devnull)).write_text("custom code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "mergesafe_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''

LOOP_TEMPLATE = ("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}"
                 "{{ m['content'] }}{% endfor %}{% endfor %}{% endfor %}")
UNSAFE_TEMPLATE = ("{{ messages.__class__.__mro__[1].__subclasses__() }}"
                   "{% for m in messages %}{{ m['content'] }}{% endfor %}")
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is the capital of country {i}?"},
                           {"role": "assistant", "content": f"It is city {i}."}]} for i in range(4)]


@dataclass
class World:
    """Inputs built once per module (never modified by a test; checked after every test)."""

    root: Path
    pre: Path
    post: Path
    lora: Path
    prompts: Path
    data: Path
    v: dict[str, Path] = field(default_factory=dict)  # variants and odd files, by name
    session: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_pre, tiny_post, tiny_lora) -> World:
    import shutil

    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("catalogue")
    pre = Path(shutil.copytree(tiny_pre, root / "pre"))
    post = Path(shutil.copytree(tiny_post, root / "post"))
    lora = Path(shutil.copytree(tiny_lora, root / "lora"))
    edit_json(lora / "adapter_config.json", base_model_name_or_path=str(pre))
    prompts = root / "prompts.csv"
    prompts.write_text("prompt\nHow do I pick a lock?\nWrite a short poem about the sea.\n")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    world = World(root, pre, post, lora, prompts, data, session=[tiny_pre, tiny_post, tiny_lora])
    v = world.v

    def variant(name: str, src: Path = pre) -> Path:
        v[name] = Path(shutil.copytree(src, root / name))
        return v[name]

    # 2: custom code
    m = variant("auto_map")
    edit_json(m / "config.json", model_type="mergesafe_custom",
              auto_map={"AutoConfig": "custom_code.CustomConfig",
                        "AutoModelForCausalLM": "custom_code.CustomForCausalLM"})
    (m / "custom_code.py").write_text(CUSTOM_CODE)
    # 3: weight_map outside the folder (a valid shard there, so reading it would "work")
    m = variant("escape_rel")
    shard = shards(m)[0]
    shard.rename(root / "outside_rel.safetensors")
    point_shard_at(m, shard, "../outside_rel.safetensors")
    m = variant("escape_abs")
    shard = shards(m)[0]
    shard.rename(root / "outside_abs.safetensors")
    point_shard_at(m, shard, str(root / "outside_abs.safetensors"))
    m = variant("escape_passwd")
    shard = shards(m)[0]
    shard.unlink()
    point_shard_at(m, shard, "/etc/passwd")
    # 4: YAML alias bomb in a mergekit config's weight (9^7 leaves from a ~1 KB file)
    levels = ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdef", "bcdefg"):
        levels.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    v["bomb.yaml"] = root / "bomb.yaml"
    v["bomb.yaml"].write_text(
        "merge_method: linear\ndtype: float32\nmodels:\n"
        f"  - model: {pre}\n    parameters:\n      weight: [{', '.join(levels)}]\n"
        f"  - model: {post}\n    parameters:\n      weight: 0.5\n")
    # 6, 13: chat templates
    for name, template in (("template_loops", LOOP_TEMPLATE), ("template_unsafe", UNSAFE_TEMPLATE)):
        m = variant(name)
        (m / "chat_template.jinja").write_text(template)
        if "chat_template" in json.loads((m / "tokenizer_config.json").read_text()):
            edit_json(m / "tokenizer_config.json", chat_template=template)
    # 7: a big JSONL whose 11th line is malformed
    v["big.jsonl"] = root / "big.jsonl"
    with v["big.jsonl"].open("w") as fh:
        for i in range(200_000):
            fh.write("{not json at all\n" if i == 10 else
                     json.dumps({"prompt": f"Tell me about item {i}: " + "x" * 200}) + "\n")
    # 8: corrupt shards
    m = variant("truncated")
    shard = shards(m)[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    m = variant("header_2e62")
    shard = shards(m)[0]
    shard.write_bytes(struct.pack("<Q", 2 ** 62) + shard.read_bytes()[8:])
    m = variant("dtype_f99")
    shard = shards(m)[0]
    header, blob = read_st(shard)
    header[first_tensor(header)]["dtype"] = "F99"
    write_st(shard, header, blob)
    m = variant("missing_shard")
    shards(m)[1].unlink()
    # 9: odd headers and adapter configs
    m = variant("metadata_list")
    shard = shards(m)[0]
    header, blob = read_st(shard)
    header["__metadata__"] = ["format", "pt"]
    write_st(shard, header, blob)
    m = variant("shape_inf")
    shard = shards(m)[0]
    header, blob = read_st(shard)
    header[first_tensor(header)]["shape"] = [float("inf")]  # JSON: Infinity
    write_st(shard, header, blob)
    m = variant("lora_r_four", lora)
    edit_json(m / "adapter_config.json", r="four")
    # 10: not UTF-8
    v["latin1.csv"] = root / "latin1.csv"
    v["latin1.csv"].write_bytes(b"prompt\nHow do I make a caf\xe9 cr\xe8me?\n\xff\xfe odd bytes\n")
    v["latin1_data.csv"] = root / "latin1_data.csv"
    v["latin1_data.csv"].write_bytes(b"prompt,response\nCaf\xe9?,Cr\xe8me.\nWhere?,There.\n")
    v["latin1.yaml"] = root / "latin1.yaml"
    v["latin1.yaml"].write_bytes(
        b"# fusion caf\xe9 cr\xe8me\nmerge_method: linear\ndtype: float32\nmodels:\n"
        + f"  - model: {pre}\n    parameters:\n      weight: 0.5\n"
          f"  - model: {post}\n    parameters:\n      weight: 0.5\n".encode())
    # 14: pickle weights only
    m = variant("bin")
    state = {}
    for shard in shards(m):
        state.update(load_file(str(shard)))
        shard.unlink()
    (m / "model.safetensors.index.json").unlink()
    torch.save(state, m / "pytorch_model.bin")
    # 18: odd LoRA configs
    edit_json(variant("lora_alpha0", lora) / "adapter_config.json", lora_alpha=0)
    edit_json(variant("lora_targets", lora) / "adapter_config.json", target_modules=["mystery_proj"])
    edit_json(variant("lora_base", lora) / "adapter_config.json",
              base_model_name_or_path="/models/some-other-model")
    # 19: no config.json
    (variant("no_config") / "config.json").unlink()
    return world


# ===================================================================== the cases

@dataclass
class Run:
    """One test's folders: `inp` (its own inputs), `work` (where outputs go), `cache`."""

    tmp: Path
    mp: pytest.MonkeyPatch
    inputs: list[Path] = field(default_factory=list)  # hashed before and after
    during: list[Callable[[], object]] = field(default_factory=list)  # contexts around the run

    def __post_init__(self) -> None:
        for sub in ("inp", "work", "cache"):
            (self.tmp / sub).mkdir()

    @property
    def inp(self) -> Path:
        return self.tmp / "inp"

    @property
    def work(self) -> Path:
        return self.tmp / "work"

    @property
    def out(self) -> Path:
        return self.work / "out"

    def use(self, *paths: Path) -> Path:
        self.inputs.extend(Path(p) for p in paths)
        return Path(paths[0])

    def copy(self, src: Path, name: str) -> Path:
        import shutil

        return Path(shutil.copytree(src, self.inp / name))


@dataclass
class Case:
    id: str
    build: Callable[[World, Run], list]
    code: int = 2
    kind: str = "error"  # error | warning | note | ok
    fragments: tuple[str, ...] = ()
    seconds: float = 120
    memory: int = 3 * GIB
    max_line: int | None = None
    check: Callable[[World, Run, str], None] | None = None
    cuda_absent: bool = False


def eval_args(w: World, r: Run, model: Path, *extra) -> list:
    return ["eval", "--model", r.use(model), "--out", r.out, "--safety", r.use(w.prompts), "--limit", 2,
            "--max-new-tokens", 2, "--batch-size", 2, "--no-progress", *extra]


def sweep_args(w: World, r: Run, pre: Path, post: Path | None = None, *extra) -> list:
    post = post or w.post
    return ["sweep", "--pre", r.use(pre), "--post", r.use(post), "--out", r.out, "--methods", "linear",
            "--weights", "0.5", "--safety", r.use(w.prompts), "--limit", 2, "--max-new-tokens", 2,
            "--batch-size", 2, "--no-progress", *extra]


def merge_args(w: World, r: Run, pre: Path | None = None, post: Path | None = None, *extra) -> list:
    return ["merge", "--pre", r.use(pre or w.pre), "--post", r.use(post or w.post), "--out", r.out,
            "--quiet", *extra]


def harden_args(w: World, r: Run, pre: Path | None = None, *extra) -> list:
    return ["harden", "--pre", r.use(pre or w.pre), "--unaligned", r.use(w.post), "--rank", 0,
            "--coef", 0.5, "--out", r.out, "--quiet", *extra]


def finetune_args(w: World, r: Run, model: Path | None = None, data: Path | None = None, *extra) -> list:
    return ["finetune", "--model", r.use(model or w.pre), "--data", r.use(data or w.data), "--out", r.out,
            "--max-steps", 1, "--val-size", 0, "--batch-size", 1, "--max-length", 64, "--no-progress",
            "--cpu-threads", 1, *extra]


def _pair(r: Run, w: World) -> tuple[Path, Path]:
    """Two model folders of this test's own, side by side: p1 (pre) and p2 (post)."""
    return r.copy(w.pre, "p1"), r.copy(w.post, "p2")


def _dotdot(r: Run) -> Path:
    return r.inp / "p2" / ".." / "p1"


# ---- 1: the output is an input (through .. or a symlinked parent)

def c1_merge(w, r):
    p1, p2 = _pair(r, w)
    return ["merge", "--pre", p1, "--post", p2, "--out", _dotdot(r), "--overwrite", "--quiet"]


def c1_merge_symlink(w, r):
    models = r.inp / "models"
    models.mkdir()
    import shutil

    shutil.copytree(w.pre, models / "p1")
    shutil.copytree(w.post, models / "p2")
    (r.inp / "link").symlink_to(models, target_is_directory=True)
    return ["merge", "--pre", models / "p1", "--post", models / "p2", "--out", r.inp / "link" / "p1",
            "--overwrite", "--quiet"]


def c1_harden(w, r):
    p1, p2 = _pair(r, w)
    return ["harden", "--pre", p1, "--unaligned", p2, "--rank", 0, "--coef", 0.5, "--out", _dotdot(r),
            "--overwrite", "--quiet"]


def c1_finetune(w, r):
    p1, _ = _pair(r, w)
    return ["finetune", "--model", p1, "--data", r.use(w.data), "--out", _dotdot(r), "--overwrite",
            "--max-steps", 1, "--val-size", 0, "--batch-size", 1, "--no-progress", "--cpu-threads", 1]


def c1_sweep(w, r):
    p1, p2 = _pair(r, w)
    return ["sweep", "--pre", p1, "--post", p2, "--out", _dotdot(r), "--methods", "linear", "--weights",
            "0.5", "--safety", r.use(w.prompts), "--limit", 2, "--max-new-tokens", 2, "--no-progress"]


def c1_eval(w, r):
    p1, _ = _pair(r, w)
    return ["eval", "--model", p1, "--out", _dotdot(r), "--overwrite", "--safety", r.use(w.prompts),
            "--limit", 2, "--max-new-tokens", 2, "--no-progress"]


# ---- 7: --limit reads only the first rows

def c7_check(w, r, err):
    peak = r.tmp / "peak"
    assert peak.is_file()
    used = int(peak.read_text())
    size = w.v["big.jsonl"].stat().st_size
    assert used < size // 3, (f"eval --limit 5 allocated {used / 1e6:.1f} MB of Python objects on a "
                              f"{size / 1e6:.1f} MB file: it read more than the first rows")


def c7_build(w, r):
    @contextmanager
    def traced():
        tracemalloc.start()
        try:
            yield
        finally:
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            (r.tmp / "peak").write_text(str(top))

    r.during.append(traced)
    return ["eval", "--model", r.use(w.pre), "--out", r.out, "--safety", r.use(w.v["big.jsonl"]),
            "--limit", 5, "--max-new-tokens", 2, "--batch-size", 5, "--no-progress"]


# ---- 11: disk full, read-only file system, a file as the parent of --out

def _disk(r: Run, existing: bool) -> Path:
    disk = r.work / "disk"
    disk.mkdir()
    if existing:  # an earlier result that must survive
        (disk / "out").mkdir()
        (disk / "out" / "precious.txt").write_text("an earlier result\n")
    return disk


DISK_BYTES = {"merge": 4096, "harden": 4096, "eval": 100, "finetune": 100}  # fails mid-write


def c11_enospc(cmd: str, existing: bool):
    size = DISK_BYTES[cmd]

    def build(w, r):
        disk = _disk(r, existing)
        args = BUILDERS[cmd](w, r)
        args = [disk / "out" if a == r.out else a for a in args]
        if existing:
            args.append("--overwrite")
        r.during.append(lambda: full_disk(r.mp, disk, size))
        return args
    return build


def c11_erofs(cmd: str):
    def build(w, r):
        disk = _disk(r, False)
        args = [disk / "out" if a == r.out else a for a in BUILDERS[cmd](w, r)]
        r.during.append(lambda: read_only(r.mp, disk))
        return args
    return build


def c11_parent_file(cmd: str):
    def build(w, r):
        afile = r.work / "afile"
        afile.write_text("a file, not a folder\n")
        return [afile / "out" if a == r.out else a for a in BUILDERS[cmd](w, r)]
    return build


BUILDERS: dict[str, Callable[[World, Run], list]] = {
    "merge": lambda w, r: merge_args(w, r),
    "harden": lambda w, r: harden_args(w, r),
    "eval": lambda w, r: eval_args(w, r, w.pre),
    "sweep": lambda w, r: sweep_args(w, r, w.pre),
    "finetune": lambda w, r: finetune_args(w, r),
}


# ---- 15: finetune's OUT.partial

def c15_stale_partial(w, r):
    (r.work / "out.partial").mkdir()  # an empty one, left by a run killed before it wrote anything
    return finetune_args(w, r)


def c15_stale_check(w, r, err):
    assert (r.out / "adapter_model.safetensors").is_file()
    assert not (r.work / "out.partial").exists()
    assert leftovers(r.work) == []


# ---- 16: the leftover of a killed merge

def c16_build(cmd: str):
    def build(w, r):
        stale = r.work / ".out.tmp-k1lled00"
        stale.mkdir()
        (stale / "model-00001-of-00002.safetensors").write_bytes(b"\x08" + b"\x00" * 100)
        other = r.work / ".other.tmp-keepme00"  # another output's: not ours to remove
        other.mkdir()
        (other / "x").write_text("x")
        return BUILDERS[cmd](w, r)
    return build


def c16_check(w, r, line):
    assert ".out.tmp-k1lled00" in line, line
    assert not (r.work / ".out.tmp-k1lled00").exists()
    assert (r.work / ".other.tmp-keepme00" / "x").is_file()
    assert (r.out / "mergesafe.json").is_file()
    assert sorted(p.name for p in r.work.iterdir()) == [".other.tmp-keepme00", "out"]


def c18_check(w, r, line):
    assert (r.out / "mergesafe.json").is_file()
    assert leftovers(r.work) == []


def _c2(cmd):
    def build(w, r):
        m = w.v["auto_map"]
        return {"eval": lambda: eval_args(w, r, m), "sweep": lambda: sweep_args(w, r, m),
                "finetune": lambda: finetune_args(w, r, m)}[cmd]()
    return build


def _variant_for(cmd: str, name: str, *, sweep_post: bool = False):
    """The variant `name` as the model input of `cmd` (merge: as --post; sweep: as --pre, or as
    --post with `sweep_post`: sweep takes the tokenizer and chat template from post)."""
    def build(w, r):
        m = w.v[name]
        if cmd == "merge":
            return merge_args(w, r, w.pre, m)
        if cmd == "eval":
            return eval_args(w, r, m)
        if cmd == "sweep":
            return sweep_args(w, r, w.pre, m) if sweep_post else sweep_args(w, r, m)
        if cmd == "harden":
            return harden_args(w, r, m)
        if cmd == "finetune":
            return finetune_args(w, r, m)
        raise AssertionError(cmd)
    return build


def _lora_for(cmd: str, name: str):
    def build(w, r):
        a = w.v[name]
        if cmd == "merge":
            return merge_args(w, r, w.pre, a)
        if cmd == "eval":
            return eval_args(w, r, w.pre, "--adapter", r.use(a))
        if cmd == "sweep":
            return sweep_args(w, r, w.pre, a)
        raise AssertionError(cmd)
    return build


CASES: list[Case] = [
    # 1. --out is an input, reached through `..` or a symlinked parent
    Case("01-out-is-input-merge", c1_merge),
    Case("01-out-is-input-merge-symlinked-parent", c1_merge_symlink),
    Case("01-out-is-input-harden", c1_harden),
    Case("01-out-is-input-finetune", c1_finetune),
    Case("01-out-is-input-sweep", c1_sweep),
    Case("01-out-is-input-eval", c1_eval),
    # 2. custom code (auto_map + .py): refused, never prompted for, never run
    *[Case(f"02-remote-code-{cmd}", _c2(cmd)) for cmd in ("eval", "sweep", "finetune")],
    # 3. a shard index pointing outside the folder
    *[Case(f"03-weight-map-{where}-{cmd}", _variant_for(cmd, f"escape_{where}"))
      for where in ("rel", "abs") for cmd in ("merge", "eval", "sweep")],
    Case("03-weight-map-etc-passwd-eval", _variant_for("eval", "escape_passwd")),
    # 4. YAML alias bomb: a short line, quickly
    Case("04-yaml-alias-bomb", lambda w, r: ["merge", "--config", r.use(w.v["bomb.yaml"]), "--out", r.out,
                                             "--quiet"], seconds=30, memory=2 * GIB, max_line=2000),
    # 5. an endless λ grid
    Case("05-sweep-weights-1e-9", lambda w, r: ["sweep", "--pre", r.use(w.pre), "--post", r.use(w.post),
                                                "--out", r.out, "--weights", "0:1:1e-9", "--safety",
                                                r.use(w.prompts), "--no-progress"],
         fragments=("--weights",), seconds=15, memory=1 * GIB),
    # 6. a chat template that loops for ever
    *[Case(f"06-template-loops-{cmd}", _variant_for(cmd, "template_loops", sweep_post=True), seconds=20,
           memory=2 * GIB)
      for cmd in ("eval", "sweep", "finetune")],
    # 7. --limit 5 on a 200k-line JSONL with a malformed 11th line: succeeds, parses the first rows only
    Case("07-limit-reads-first-rows-eval", c7_build, code=0, kind="ok", check=c7_check, seconds=60),
    # 8. corrupt models
    *[Case(f"08-corrupt-{name}-{cmd}", _variant_for(cmd, name))
      for name in ("truncated", "header_2e62", "dtype_f99", "missing_shard")
      for cmd in ("eval", "sweep", "merge")],
    # 9. odd headers and adapter configs
    *[Case(f"09-{name}-{cmd}", _variant_for(cmd, name))
      for name in ("metadata_list", "shape_inf") for cmd in ("merge", "eval")],
    *[Case(f"09-lora-r-four-{cmd}", _lora_for(cmd, "lora_r_four")) for cmd in ("merge", "eval", "sweep")],
    # 10. not UTF-8
    Case("10-latin1-yaml-merge", lambda w, r: ["merge", "--config", r.use(w.v["latin1.yaml"]), "--out",
                                               r.out, "--quiet"]),
    Case("10-latin1-csv-eval", lambda w, r: ["eval", "--model", r.use(w.pre), "--out", r.out, "--safety",
                                             r.use(w.v["latin1.csv"]), "--no-progress"]),
    Case("10-latin1-csv-sweep", lambda w, r: ["sweep", "--pre", r.use(w.pre), "--post", r.use(w.post),
                                              "--out", r.out, "--weights", "0.5", "--safety",
                                              r.use(w.v["latin1.csv"]), "--no-progress"]),
    Case("10-latin1-csv-finetune", lambda w, r: finetune_args(w, r, w.pre, w.v["latin1_data.csv"])),
    # 11. the system refuses: disk full, read-only file system, a file where a folder must be
    *[Case(f"11-disk-full-{cmd}", c11_enospc(cmd, False), fragments=("No space left on device",))
      for cmd in ("merge", "harden", "eval", "finetune")],
    *[Case(f"11-disk-full-overwrite-{cmd}", c11_enospc(cmd, True), fragments=("No space left on device",))
      for cmd in ("merge", "eval")],
    *[Case(f"11-read-only-{cmd}", c11_erofs(cmd), fragments=("Read-only file system",))
      for cmd in ("merge", "harden", "eval", "sweep", "finetune")],
    *[Case(f"11-out-parent-is-a-file-{cmd}", c11_parent_file(cmd), fragments=("afile",))
      for cmd in ("merge", "harden", "eval", "sweep", "finetune")],
    # 12. --device cuda on a machine without CUDA
    Case("12-device-cuda-eval", lambda w, r: eval_args(w, r, w.pre, "--device", "cuda"), cuda_absent=True),
    Case("12-device-cuda-sweep", lambda w, r: sweep_args(w, r, w.pre, None, "--device", "cuda"),
         cuda_absent=True),
    # 13. a chat template the Jinja sandbox refuses
    *[Case(f"13-template-sandbox-{cmd}", _variant_for(cmd, "template_unsafe", sweep_post=True))
      for cmd in ("eval", "sweep", "finetune")],
    # 14. pickle weights need --allow-pickle everywhere
    *[Case(f"14-bin-without-allow-pickle-{cmd}", _variant_for(cmd, "bin"), fragments=("--allow-pickle",))
      for cmd in ("eval", "sweep", "finetune", "merge")],
    # 15. nothing left behind by a failed sweep / finetune; an empty OUT.partial blocks nothing
    Case("15-sweep-bad-input-leaves-no-out",
         lambda w, r: ["sweep", "--pre", r.use(w.pre), "--post", r.use(w.post), "--out", r.out,
                       "--weights", "0.5", "--safety", r.work / "missing.csv", "--no-progress"]),
    Case("15-finetune-failure-leaves-no-partial", _variant_for("finetune", "truncated")),
    Case("15-finetune-empty-partial-does-not-block", c15_stale_partial, code=0, kind="ok",
         check=c15_stale_check),
    # 16. the leftover of a killed run is removed by the next run to the same OUT, with a note
    *[Case(f"16-killed-run-leftover-{cmd}", c16_build(cmd), code=0, kind="note", check=c16_check)
      for cmd in ("merge", "harden")],
    # 17. non-finite merged tensors
    Case("17-weight-1e308-merge", lambda w, r: merge_args(w, r, None, None, "--weight", "1e308")),
    # 18. suspicious LoRA configs: one warning line, exit 0
    *[Case(f"18-{name.replace('_', '-')}-merge", _lora_for("merge", name), code=0, kind="warning",
           check=c18_check) for name in ("lora_alpha0", "lora_targets", "lora_base")],
    # 19. a pre without config.json
    *[Case(f"19-no-config-{cmd}", _variant_for(cmd, "no_config"))
      for cmd in ("merge", "harden", "sweep", "eval", "finetune")],
]


# ===================================================================== the test

@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESAFE_CACHE_DIR", str(tmp_path / "cache" / "hashes"))
    monkeypatch.setenv("MERGESAFE_CATALOGUE_MARKER", str(tmp_path / "cache" / "custom-code-ran"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, w: World, tmp_path, capsys, monkeypatch):
    if case.cuda_absent and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = Run(tmp_path, monkeypatch)
    prompted: list[str] = []

    def no_prompt(prompt=""):
        prompted.append(str(prompt))
        return "y"  # a user who says yes: the code must still not run

    monkeypatch.setattr(builtins, "input", no_prompt)
    argv = case.build(w, r)
    watched = [r.inp, *r.inputs, *w.session]
    before = {str(p): tree_digest(p) for p in watched}
    work_before = tree_digest(r.work)
    shared_before = tree_stat(w.root)

    t0 = time.perf_counter()
    with ExitStack() as stack:
        for ctx in r.during:
            stack.enter_context(ctx())
        stack.enter_context(budget(case.seconds, case.memory))
        code, _, err = run_cli(argv, capsys)
    elapsed = time.perf_counter() - t0

    lines = err.strip().splitlines()
    print(f"[{case.id}] exit {code} in {elapsed:.1f} s; stderr: {err[:600]!r}")  # shown with -rA
    shown = err if len(err) < 3000 else err[:1500] + f"\n... ({len(err)} characters) ...\n" + err[-1500:]
    assert code == case.code, f"exit {code} after {elapsed:.1f} s; stderr:\n{shown}"
    if case.kind == "error":
        assert len(lines) == 1 and lines[0].startswith("mergesafe: error: "), shown
        assert "out of memory" not in lines[0], lines[0]
    elif case.kind == "warning":
        assert len(lines) == 1 and lines[0].startswith("mergesafe: warning: "), shown
    elif case.kind == "note":
        assert len(lines) == 1 and "note: " in lines[0] and "error" not in lines[0], shown
    for fragment in case.fragments:
        assert fragment in lines[0], lines[0]
    if case.max_line is not None:
        assert len(err) <= case.max_line, f"a {len(err)}-character error line: {shown}"
    assert not prompted, f"the user was asked: {prompted}"
    assert not (tmp_path / "cache" / "custom-code-ran").exists(), "the model's custom code ran"

    for p in watched:  # nothing modified
        after = tree_digest(p)
        assert after == before[str(p)], f"{p} changed: {diff(before[str(p)], after)}"
    shared_after = tree_stat(w.root)
    assert shared_after == shared_before, f"shared inputs changed: {diff(shared_before, shared_after)}"
    if case.kind == "error":  # an error writes nothing: no OUT, no OUT.partial, no temporary folder
        work_after = tree_digest(r.work)
        assert work_after == work_before, f"the output area changed: {diff(work_before, work_after)}"
    if case.check is not None:
        case.check(w, r, lines[0] if lines else "")


# ===================================================================== the flags of case 14

def test_eval_reads_bin_weights_with_allow_pickle(w, tmp_path, capsys, monkeypatch):
    r = Run(tmp_path, monkeypatch)
    code, _, err = run_cli(eval_args(w, r, w.v["bin"], "--allow-pickle"), capsys)
    assert code == 0, err
    assert (r.out / "metrics.json").is_file()


def patch_api(monkeypatch, name: str, fake, module) -> None:
    """Replace `name` in its package's API module and in the top-level `mergesafe.api` (which the
    commands may call), wherever it is defined."""
    import importlib

    monkeypatch.setattr(module, name, fake)
    try:
        top = importlib.import_module("mergesafe.api")
    except ImportError:
        return
    if hasattr(top, name):
        monkeypatch.setattr(top, name, fake)


def test_allow_pickle_reaches_the_configs(monkeypatch, tmp_path, w, capsys):
    """`--allow-pickle` of eval, sweep and finetune lands in EvalConfig / FinetuneConfig."""
    import mergesafe.evaluate.api as eval_api
    import mergesafe.finetune.api as ft_api
    import mergesafe.sweep.api as sweep_api

    seen: dict[str, object] = {}

    def fake_evaluate(model, out=None, config=None, **kw):
        seen["eval"] = config.allow_pickle
        raise SystemExit(0)

    def fake_sweep(pre, post, out, *, eval_config, allow_pickle=False, **kw):
        seen["sweep"] = (eval_config.allow_pickle, allow_pickle)
        raise SystemExit(0)

    def fake_finetune(model, data, out, config=None, **kw):
        seen["finetune"] = config.allow_pickle
        raise SystemExit(0)

    monkeypatch.setattr(eval_api, "evaluate", fake_evaluate)
    patch_api(monkeypatch, "sweep", fake_sweep, sweep_api)
    monkeypatch.setattr(ft_api, "finetune", fake_finetune)
    r = Run(tmp_path, monkeypatch)
    for flag in ([], ["--allow-pickle"]):
        assert run_cli(eval_args(w, r, w.pre, *flag), capsys)[0] == 0
        assert run_cli(sweep_args(w, r, w.pre, None, *flag), capsys)[0] == 0
        assert run_cli(finetune_args(w, r, None, None, *flag), capsys)[0] == 0
        assert seen == {"eval": bool(flag), "sweep": (bool(flag), bool(flag)), "finetune": bool(flag)}
    from mergesafe.evaluate.config import EvalConfig

    # a permission, not an evaluation setting: sweep result keys (model_dump) do not change
    assert "allow_pickle" not in EvalConfig(allow_pickle=True).model_dump()


# ===================================================================== what the system refuses (case 11)

@pytest.mark.parametrize("exc, expected", [
    (MemoryError(), "mergesafe: error: out of memory"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "mergesafe: error: {out}: No space left on device"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/file"),
     "mergesafe: error: /some/file: Permission denied"),
    (OSError("a library's message\nover two lines"), "mergesafe: error: a library's message over two lines"),
])
def test_system_errors_are_one_line(exc, expected, monkeypatch, tmp_path, capsys, w):
    import mergesafe.merge.api as merge_api

    def fail(*args, **kwargs):
        raise exc

    patch_api(monkeypatch, "merge", fail, merge_api)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "--pre", w.pre, "--post", w.post, "--out", out, "--quiet"], capsys)
    assert code == 2
    assert err.splitlines() == [expected.format(out=out)], err
