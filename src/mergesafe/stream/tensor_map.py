"""The streaming map over whole checkpoints: one tensor at a time, constant memory in the number
of layers, written straight into sharded safetensors inside an atomic output folder.

A :class:`StreamPlan` (built by :mod:`mergesafe.merge.api` for pre/post merges, by
:mod:`mergesafe.merge.config` for mergekit YAML, and by :mod:`mergesafe.restore` for the
safety-restoration methods and LoX hardening) says which inputs exist, which tensors the output
has, and how to compute one output tensor from its inputs.  :func:`execute` validates everything
that can be validated before writing, then streams: a reader thread loads the next tensor's
inputs while the current one is computed and written.  A computed tensor with inf or NaN is an
error unless the plan allows it (``--allow-nonfinite``).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergesafe.checkpoint import (
    BackgroundHasher,
    OutEntry,
    StreamingShardWriter,
    atomic_output_dir,
    check_output_dir,
    copy_model_files,
    describe_input,
    has_tokenizer,
    write_manifest,
)
from mergesafe.checkpoint.vocab import reset_vocab_warnings, vocab_rows
from mergesafe.errors import UserError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).strip().lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown {what} {value!r}; choose float32, float16 or bfloat16") from None


@dataclass
class Source:
    """One input checkpoint with a label for messages (``pre``, ``post``, ``post 2``, ...)."""

    label: str
    ckpt: Any  # Checkpoint or AdapterView
    role: str = "input"

    @property
    def dir(self) -> Path:
        return Path(self.ckpt.dir)


@dataclass
class StreamPlan:
    """Everything :func:`execute` needs to stream one merge."""

    kind: str  # manifest "kind"
    reference: Source  # defines the output tensor names, order and default dtypes ("pre")
    sources: list[Source]  # every input, reference included
    # merge one floating tensor: name, {source label: float32 tensor} -> float32 tensor
    compute: Callable[[str, dict[str, torch.Tensor]], torch.Tensor]
    out_dtype: torch.dtype | None = None  # None: the reference tensor's dtype
    input_dtype: torch.dtype | None = None  # round inputs to this dtype first (mergekit ``dtype``)
    tokenizer_src: Path | None = None
    generation_src: list[Path] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)  # method, params, seed, inputs, ...
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # True when ``compute`` is elementwise (linear, task arithmetic): big tensors may then be
    # streamed in row blocks, with bit-identical results and far less memory
    elementwise: bool = False
    # False: a computed floating tensor with inf or NaN stops the merge (nothing is written)
    allow_nonfinite: bool = False


# ---------------------------------------------------------------------------------------------
# Validation before anything is written
# ---------------------------------------------------------------------------------------------

def _num_layers(config: dict) -> Any:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        return _num_layers(text)
    return None


def check_architectures(reference: Source, others: list[Source]) -> None:
    """model_type, layer count and tied embeddings must agree (when both configs say)."""
    rc = reference.ckpt.config
    for src in others:
        if src.ckpt is reference.ckpt or getattr(src.ckpt, "base", None) is reference.ckpt:
            continue
        oc = src.ckpt.config
        checks = [("model_type", rc.get("model_type"), oc.get("model_type")),
                  ("number of layers", _num_layers(rc), _num_layers(oc)),
                  ("tie_word_embeddings", rc.get("tie_word_embeddings"), oc.get("tie_word_embeddings"))]
        for what, a, b in checks:
            if a is not None and b is not None and a != b:
                raise UserError(f"architectures differ: {what} is {a!r} in {reference.label} "
                                f"({reference.dir}) but {b!r} in {src.label}", src.dir)


def plan_outputs(reference: Source, sources: list[Source], out_dtype: torch.dtype | None
                 ) -> tuple[list[OutEntry], dict[str, tuple[int, int]]]:
    """Check tensor names and shapes across inputs; return the output entries and the tensors
    whose vocabulary grew (name -> (shared rows, output rows))."""
    ref = reference.ckpt
    names = ref.names()
    name_set = set(names)
    for src in sources:
        if src.ckpt is ref:
            continue
        other = set(src.ckpt.names())
        missing = [n for n in names if n not in other and n not in src.ckpt]
        if missing:
            raise UserError(f"tensor {missing[0]!r} is missing (it is in {reference.label} "
                            f"{reference.dir})" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                   else ""), src.dir)
        extra = sorted(other - name_set)
        if extra:
            raise UserError(f"tensor {extra[0]!r} is not in {reference.label} ({reference.dir})"
                            + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""), src.dir)
    entries = []
    grown: dict[str, tuple[int, int]] = {}
    labels = [s.label for s in sources]
    ref_index = next(i for i, s in enumerate(sources) if s.ckpt is ref)
    for name in names:
        shapes = [torch.Size(s.ckpt.shape(name)) for s in sources]
        try:
            rows = vocab_rows(name, shapes, ref_index, labels)
        except UserError as err:
            culprit = next((s for s, sh in zip(sources, shapes) if sh != shapes[ref_index]), reference)
            raise UserError(str(err), culprit.dir) from None
        shape = tuple(ref.shape(name))
        if rows is not None:
            n, n_out, _ = rows
            shape = (n_out, *shape[1:])
            grown[name] = (n, n_out)
        dt = ref.dtype(name)
        if dt.is_floating_point and out_dtype is not None:
            dt = out_dtype
        entries.append(OutEntry(name, shape, dt))
    return entries, grown


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("merging"), BarColumn(), TextColumn("{task.completed}/"
                                "{task.total}"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("merge", total=total)
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _AsyncWriter:
    """Write tensors on a background thread (one tensor in flight) while the next is merged."""

    def __init__(self, writer: StreamingShardWriter) -> None:
        import queue
        import threading

        self.writer = writer
        self.q: "queue.Queue" = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mergesafe-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    try:
                        self.writer.write_part(*item)
                    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                        self.error = err
            finally:
                del item
                self.q.task_done()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, tensor))

    def wait_idle(self) -> None:
        """Wait until everything queued so far is written."""
        self.q.join()
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Skip whatever is queued, let the current write finish, and wait for the thread."""
        if self.error is None:
            self.error = RuntimeError("merge aborted")
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=0.1)
                break
            except Exception:  # noqa: BLE001 - queue full: the thread is still writing
                continue
        self.thread.join()


def _load(plan: StreamPlan, name: str, rows: tuple[int, int] | None = None
          ) -> dict[str, torch.Tensor]:
    out = {}
    for src in plan.sources:
        ck = src.ckpt
        if (rows is None and plan.input_dtype is None and getattr(ck, "kind", "") == "safetensors"
                and ck.dtype(name) in (torch.bfloat16, torch.float16)
                and int(torch.Size(ck.shape(name)).numel()) > BLOCK_ELEMENTS):
            out[src.label] = _read_as_float32(ck, name)
            continue
        t = ck.get(name) if rows is None else ck.get(name, rows)
        if t.is_floating_point():
            if plan.input_dtype is not None and t.dtype != plan.input_dtype:
                t = t.to(plan.input_dtype)
            t = t.float()
        out[src.label] = t
    return out


def _read_as_float32(ck, name: str) -> torch.Tensor:
    """A big half-precision tensor read block by block straight into float32 (same values as
    ``get(name).float()``, without a full-size half-precision copy in memory)."""
    shape = tuple(ck.shape(name))
    out = torch.empty(shape, dtype=torch.float32)
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, BLOCK_ELEMENTS // per_row)
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        out[a:b].copy_(ck.get(name, (a, b)))
    return out


BLOCK_ELEMENTS = 1 << 20  # rows per block: about 1M elements (4 MiB in float32)
PREFETCH_ELEMENTS = 1 << 24  # bigger tensors are not read ahead, nor written behind


def _work_items(plan: StreamPlan, order: list[str], grown: dict) -> list[tuple[str, Any]]:
    """(tensor name, rows or None) in writing order; big tensors of elementwise merges from
    plain checkpoints are split into row blocks."""
    blockable = plan.elementwise and all(getattr(s.ckpt, "kind", "") == "safetensors"
                                         for s in plan.sources)
    items: list[tuple[str, Any]] = []
    ref = plan.reference.ckpt
    for name in order:
        shape = tuple(ref.shape(name))
        numel = int(torch.Size(shape).numel())
        if (not blockable or name in grown or len(shape) == 0 or numel <= BLOCK_ELEMENTS
                or not ref.dtype(name).is_floating_point):
            items.append((name, None))
            continue
        per_row = max(1, numel // shape[0])
        step = max(1, BLOCK_ELEMENTS // per_row)
        items.extend((name, (a, min(shape[0], a + step))) for a in range(0, shape[0], step))
    return items


def _non_float(plan: StreamPlan, name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = loaded[plan.reference.label]
    for label, t in loaded.items():
        if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
            raise UserError(f"tensor {name!r}: non-floating tensor differs between "
                            f"{plan.reference.label} and {label}")
    return ref


_MALLOC_TUNED = False
MMAP_THRESHOLD = 32 << 20  # bigger blocks: fresh mmap each time (they would fragment the heap)


def tune_malloc() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the kernel.

    A streamed merge allocates and frees tensors of the same few sizes over and over; glibc's
    adaptive thresholds end up serving many of them with a fresh ``mmap`` (or trimming the heap),
    so each pays page faults and zeroing (2-4x the cost of the arithmetic).  Fixed thresholds keep
    blocks below 32 MiB (layers, row blocks) in one reusable heap and give bigger ones (embedding
    tables) their own mappings, which would otherwise fragment the heap; peak memory stays that
    of the tensors in flight.  Linux/glibc only; a no-op elsewhere.  Process-wide and permanent (freed memory stays
    with the process), so only the ``mergesafe merge`` command calls it, never the library.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux") or os.environ.get("MERGESAFE_NO_MALLOPT"):
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD (a C int)
        libc.mallopt(-8, int(os.environ.get("MERGESAFE_ARENA_MAX", "1")))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _compute_threads() -> int:
    """Threads for torch's kernels during a streamed merge.

    The merge runs three pipelined stages (read ahead, merge, write behind) and the kernels are
    memory-bound: on small machines one compute thread is much faster than torch's default,
    whose threads otherwise wait on each other whenever a core is busy (measured on 2 cores:
    TIES 13 s with 2 threads, 4.6 s with 1).  ``MERGESAFE_THREADS`` overrides.
    """
    if os.environ.get("MERGESAFE_THREADS"):
        return max(1, int(os.environ["MERGESAFE_THREADS"]))
    return max(1, min(4, (os.cpu_count() or 2) // 4))


def execute(plan: StreamPlan, out: str | Path, *, overwrite: bool = False,
            shard_size: int = 5 * 10**9, progress: bool = False, prefetch: bool | None = None) -> Path:
    """Validate, then stream the merge into ``out`` atomically.  Returns the output path.

    Pipeline: a reader thread loads the next tensor's inputs (``prefetch``), the calling thread
    merges, a writer thread appends the previous result to its shard -- at most three tensors
    in flight, whatever the number of layers.  ``MERGESAFE_NO_PREFETCH=1`` and
    ``MERGESAFE_SYNC_WRITE=1`` turn the helper threads off.
    """
    t0 = time.perf_counter()
    reset_vocab_warnings()  # warn once per merge
    out = check_output_dir(out, overwrite)
    check_architectures(plan.reference, plan.sources)
    entries, grown = plan_outputs(plan.reference, plan.sources, plan.out_dtype)
    files = [f for s in plan.sources for f in s.ckpt.files()]
    hasher = BackgroundHasher(files)
    timings: dict[str, float] = {}
    if prefetch is None:
        prefetch = not os.environ.get("MERGESAFE_NO_PREFETCH")
    prev_threads = torch.get_num_threads()
    bar = None
    pool = None
    try:
        torch.set_num_threads(_compute_threads())
        if prefetch:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergesafe-read")
        with atomic_output_dir(out, overwrite) as tmp:
            writer = StreamingShardWriter(tmp, entries, shard_size)
            async_writer = None if os.environ.get("MERGESAFE_SYNC_WRITE") else _AsyncWriter(writer)
            bar = _Progress(len(writer.order), progress)
            t_merge = time.perf_counter()
            try:
                _stream(plan, writer, async_writer, pool, bar, grown,
                        {e.name: e for e in entries})
            except BaseException:
                # stop the writer thread before the temporary folder is removed
                if async_writer is not None:
                    async_writer.stop()
                writer.abort()
                raise
            writer.close()
            timings["merge_s"] = time.perf_counter() - t_merge
            bar.close()
            ref_cfg = dict(plan.reference.ckpt.config)
            overrides = dict(plan.config_overrides)
            if grown and "vocab_size" in ref_cfg:
                overrides["vocab_size"] = max(n_out for _, n_out in grown.values())
            out_dt = plan.out_dtype or plan.reference.ckpt.model_dtype()
            copy_model_files(ref_cfg, tmp, tokenizer_src=plan.tokenizer_src,
                             generation_src=plan.generation_src or [plan.reference.dir],
                             dtype=out_dt, overrides=overrides)
            t_hash = time.perf_counter()
            hashes = hasher.result()
            timings["hash_wait_s"] = time.perf_counter() - t_hash
            timings["total_s"] = time.perf_counter() - t0
            m = dict(plan.manifest)
            inputs = hash_records(m.pop("inputs", None) or {}, plan, hashes)
            write_manifest(tmp, kind=plan.kind, inputs=inputs, timings=timings,
                           output={"dtype": str(out_dt).removeprefix("torch."),
                                   "files": writer.files, "tensors": len(writer.order),
                                   "vocabulary_growth": {k: list(v) for k, v in grown.items()}},
                           **m)
    except BaseException:
        hasher.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev_threads)
    return out


def _stream(plan: StreamPlan, writer: StreamingShardWriter, async_writer: "_AsyncWriter | None",
            pool: ThreadPoolExecutor | None, bar: _Progress, grown: dict,
            planned: dict[str, OutEntry]) -> None:
    """The merge loop: load (ahead, on ``pool``), merge, cast, write (behind, on the writer)."""
    items = _work_items(plan, writer.order, grown)
    ref = plan.reference.ckpt

    def ahead(item) -> bool:  # read ahead only what is small (blocks always are)
        name, rows = item
        return rows is not None or int(torch.Size(ref.shape(name)).numel()) <= PREFETCH_ELEMENTS

    pending = None
    for i, (name, rows) in enumerate(items):
        if pending is not None:
            loaded = pending.result()
        else:
            loaded = _load(plan, name, rows)
        pending = None
        if pool is not None and i + 1 < len(items) and ahead(items[i + 1]):
            pending = pool.submit(_load, plan, *items[i + 1])
        ref_t = loaded[plan.reference.label]
        if async_writer is not None and rows is None and ref_t.numel() > PREFETCH_ELEMENTS:
            async_writer.wait_idle()  # one big result in memory at a time
        if ref_t.is_floating_point():
            result = plan.compute(name, loaded)
        else:
            result = _non_float(plan, name, loaded)
        del loaded, ref_t
        dtype = planned[name].dtype
        if result.dtype != dtype:
            result = result.to(dtype)
        if not plan.allow_nonfinite and result.is_floating_point():
            check_finite(name, result)  # after the cast: float16 overflows to inf
        if async_writer is not None:
            async_writer.put(name, result)
        else:
            writer.write_part(name, result, whole=rows is None)
        del result
        if rows is None or rows[1] == planned[name].shape[0]:
            bar.advance()
    if pending is not None:
        pending.cancel()
    if async_writer is not None:
        async_writer.join()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """A merged tensor with inf or NaN is an error (``--allow-nonfinite`` accepts it).

    Fast path: any inf or NaN makes the sum non-finite, so a finite sum (one read, nothing
    allocated) proves every element finite; only a non-finite sum (or an overflowing one) pays
    for the elementwise check."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return
    n_bad = int((~torch.isfinite(tensor)).sum())
    if n_bad:
        raise UserError(f"tensor {name!r}: the result has {n_bad} non-finite values (inf/NaN); "
                        "check --weight and --param, or pass --allow-nonfinite to write it anyway")


def hash_records(inputs: dict[str, Any], plan: StreamPlan, hashes: dict[Path, str]) -> dict:
    """Replace Source objects (or lists of them) in ``inputs`` by hashed records."""
    def rec(v: Any) -> Any:
        if isinstance(v, Source):
            r = describe_input(v.dir, files=v.ckpt.files(), hashes=hashes)
            base = getattr(v.ckpt, "base", None)
            if base is not None:
                r["adapter_of"] = str(Path(base.dir).absolute())
            return r
        if isinstance(v, (list, tuple)):
            return [rec(x) for x in v]
        if isinstance(v, Path):
            return describe_input(v, hashes=hashes)
        return v
    return {k: rec(v) for k, v in inputs.items()}


def tokenizer_folder(primary: Source, fallback: Source) -> Path | None:
    """The folder to copy tokenizer files from: ``primary`` if it has a tokenizer, else
    ``fallback`` (an adapter folder without tokenizer files falls back to its base)."""
    for src in (primary, fallback):
        if has_tokenizer(src.dir):
            return src.dir
    base = getattr(primary.ckpt, "base", None)
    if base is not None and has_tokenizer(base.dir):
        return Path(base.dir)
    return None
