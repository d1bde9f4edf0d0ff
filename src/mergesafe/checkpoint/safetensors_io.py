"""Low-level safetensors reading and streaming writing, without mmap.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`` padded with spaces, then the data buffer.  Offsets are relative to
the buffer, contiguous, and the buffer ends exactly at the last tensor's end.

Reading: every header is validated when the file is opened (bad header, offsets outside the
file, truncated data, wrong byte counts) so that a corrupted input is refused before any output
is written.  Tensors are read with ``os.preadv`` straight into a fresh torch buffer: one copy
from the page cache, no memory map, so the resident memory of a streamed merge stays bounded by
the tensors in flight rather than growing with the files read.

Writing: :class:`StreamingShardWriter` knows every tensor's name, shape and dtype in advance.
It writes each shard's header first and then each tensor's bytes as soon as it is produced, so
memory never holds a whole shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mergesafe.errors import UserError, echo

# safetensors dtype tag <-> torch dtype
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _tag, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        ST_TO_TORCH[_tag] = getattr(torch, _name)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

MAX_HEADER = 100 * 1024 * 1024  # the same limit as the safetensors library
MAX_RANK = 64  # no real tensor comes close; keeps hostile shapes cheap to check
MAX_ELEMENTS = 2**48  # a shape whose (non-zero) dimensions multiply past this is absurd


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte count, dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {echo(key)}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header_json(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                            object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as err:
        raise UserError(f"corrupted safetensors header: not UTF-8 (byte {err.start})", path) from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, duplicates, ints of > 4300 digits
        msg = " ".join(str(err).split())
        raise UserError(f"corrupted safetensors header: {msg[:120]}", path) from None
    except RecursionError:
        raise UserError("corrupted safetensors header: JSON nested too deeply", path) from None
    if not isinstance(header, dict):
        raise UserError("corrupted safetensors header: not a JSON object", path)
    return header


def _parse_metadata(metadata: object, path: Path) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError("corrupted safetensors header: __metadata__ must map strings to strings",
                        path)
    return metadata


def _parse_entry(name: str, entry: object, path: Path) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one tensor entry; returns ``(dtype, shape, begin, end)``."""
    where = f"corrupted safetensors header: tensor {echo(name)}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object with dtype, shape and data_offsets, got "
                        f"{type(entry).__name__}", path)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise UserError(f"{where} lacks {key!r}", path)
    tag = entry["dtype"]
    if not isinstance(tag, str) or tag not in ST_TO_TORCH:
        raise UserError(f"{where} has an unknown dtype {echo(tag, 40)}", path)
    shape = entry["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(_is_int(s) and s >= 0 for s in shape)):
        raise UserError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative "
                        f"integers, got {echo(shape, 60)}", path)
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets must be two integers 0 <= begin <= end, got "
                        f"{echo(offsets, 60)}", path)
    span = 1
    for s in shape:
        span *= max(s, 1)
        if span > MAX_ELEMENTS:
            raise UserError(f"{where}: absurd shape {echo(shape, 60)}", path)
    return ST_TO_TORCH[tag], tuple(shape), offsets[0], offsets[1]


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return ``({name: TensorInfo}, metadata)``.

    Raises :class:`UserError` naming the file for a bad header or a wrong file length: anything
    but a JSON object of ``{dtype: known tag, shape: [int >= 0, ...], data_offsets: [begin, end]}``
    entries (plus an optional ``__metadata__`` of strings) whose byte counts match their shapes and
    whose data exactly tiles the rest of the file.  JSON ``NaN``/``Infinity``, floats, booleans
    and duplicate keys are refused, as the safetensors library does.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"not a safetensors file: {size} bytes, too short for a header", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(
                    f"corrupted or truncated safetensors file: header length {n} does not fit in "
                    f"{size} bytes", path)
            raw = f.read(n)
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror or err}", path) from None
    if len(raw) != n:
        raise UserError("truncated safetensors file: the header is cut short", path)
    header = _parse_header_json(raw, path)
    metadata = _parse_metadata(header.pop("__metadata__", None), path)
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, begin, end = _parse_entry(name, entry, path)
        numel = 0 if 0 in shape else math.prod(shape)
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes:
            raise UserError(f"corrupted safetensors header: tensor {echo(name)} has {end - begin} "
                            f"bytes for shape {echo(list(shape), 60)} {entry['dtype']} (expected {nbytes})", path)
        if end > data_len:
            raise UserError(f"truncated safetensors file: tensor {echo(name)} ends at byte "
                            f"{data_start + end} but the file has {size} bytes", path)
        spans.append((begin, end))
        infos[name] = TensorInfo(name, path, data_start + begin, nbytes, dtype, shape)
    spans.sort()
    expected = 0
    for begin, end in spans:
        if begin != expected:
            raise UserError("corrupted safetensors header: tensor data overlaps or leaves gaps", path)
        expected = end
    if expected != data_len:
        raise UserError(f"corrupted safetensors file: header describes {expected} bytes of data, the "
                        f"file has {data_len}", path)
    return infos, dict(metadata)


def read_tensor(info: TensorInfo, fd: int | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or rows ``[start, stop)`` of its first dimension) into freshly allocated
    memory (no mmap), in its stored dtype."""
    shape, offset, nbytes = info.shape, info.offset, info.nbytes
    if rows is not None:
        start, stop = rows
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {rows} out of range for {info.name} {list(shape)}")
        row_bytes = nbytes // shape[0] if shape[0] else 0
        shape = (stop - start, *shape[1:])
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
    if nbytes == 0:
        return torch.empty(shape, dtype=info.dtype)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    own = fd is None
    if own:
        fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise UserError(f"truncated safetensors file while reading tensor {info.name!r}", info.file)
            done += got
    finally:
        if own:
            os.close(fd)
    return buf.view(info.dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutEntry:
    """A tensor to be written: its name, shape and dtype, known before its values are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(value: str | int | None, default: int = 5 * 1024**3) -> int:
    """Parse a shard size: ``5GB``, ``500MB``, ``2GiB``, ``1000000`` (bytes)."""
    if value is None:
        return default
    if isinstance(value, int):
        if value <= 0:
            raise UserError(f"shard size must be positive, got {value}")
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    num = text.rstrip("KMGTIB")
    unit = text[len(num):]
    try:
        size = int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"cannot parse shard size {value!r} (examples: 5GB, 500MB, 2GiB)") from None
    if size <= 0:
        raise UserError(f"shard size must be positive, got {value!r}")
    return size


def plan_shards(entries: Sequence[OutEntry], max_shard_size: int) -> list[list[OutEntry]]:
    """Split entries, in order, into shards of at most ``max_shard_size`` bytes of data.

    A tensor larger than the limit gets a shard of its own (as in transformers).  Inside a
    shard, tensors are ordered by element size (largest first, stable) so that every tensor
    starts at an offset aligned to its element size.
    """
    shards: list[list[OutEntry]] = []
    current: list[OutEntry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current or not shards:
        shards.append(current)
    return [sorted(s, key=lambda e: -e.dtype.itemsize) for s in shards]


def _header_bytes(entries: Sequence[OutEntry], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": TORCH_TO_ST[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so that the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class StreamingShardWriter:
    """Write a (possibly sharded) safetensors checkpoint one tensor at a time.

    Usage::

        writer = StreamingShardWriter(folder, entries, max_shard_size=5 * 10**9)
        for name in writer.order:          # the order in which tensors must be produced
            writer.write(name, tensor)
        writer.close()                     # writes model.safetensors.index.json if sharded

    ``entries`` fixes names, shapes and dtypes up front.  Each shard's header is written when
    the shard is started, then every tensor's bytes are appended as they arrive; a tensor is
    checked against its planned shape and dtype.  One shard gives ``model.safetensors``;
    several give ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
    the layout ``transformers.from_pretrained`` loads.
    """

    def __init__(self, folder: str | Path, entries: Iterable[OutEntry], max_shard_size: int,
                 *, basename: str = "model", metadata: dict[str, str] | None = None,
                 index_metadata: dict | None = None) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.index_metadata = dict(index_metadata or {})
        entries = list(entries)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.shards = plan_shards(entries, max_shard_size)
        n = len(self.shards)
        self.basename = basename
        if n == 1:
            self.files = [f"{basename}.safetensors"]
        else:
            self.files = [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order: list[str] = [e.name for shard in self.shards for e in shard]
        self._planned = {e.name: e for shard in self.shards for e in shard}
        self._shard_of = {e.name: i for i, shard in enumerate(self.shards) for e in shard}
        self._pos = 0
        self._part_done = 0
        self._shard = -1
        self._fh = None
        self.total_size = sum(e.nbytes for e in entries)

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = i
        self._fh = open(self.folder / self.files[i], "wb")
        self._fh.write(_header_bytes(self.shards[i], self.metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be ``self.order[k]`` for the k-th call."""
        self.write_part(name, tensor, whole=True)

    def write_part(self, name: str, part: torch.Tensor, *, whole: bool = False) -> None:
        """Append the next rows (first dimension) of tensor ``name``; the tensor is complete
        once all its bytes have arrived.  ``write`` is ``write_part`` with the whole tensor."""
        if self._pos >= len(self.order) or self.order[self._pos] != name:
            expected = self.order[self._pos] if self._pos < len(self.order) else "nothing"
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        e = self._planned[name]
        shape = tuple(part.shape)
        ok = part.dtype == e.dtype and (shape == e.shape if whole or not e.shape
                                        else shape[1:] == e.shape[1:])
        if not ok:
            raise RuntimeError(f"tensor {name!r}: planned {list(e.shape)} {e.dtype}, got "
                               f"{list(part.shape)} {part.dtype}")
        nbytes = part.numel() * part.element_size()
        if self._part_done + nbytes > e.nbytes:
            raise RuntimeError(f"tensor {name!r}: more data than planned")
        shard = self._shard_of[name]
        if shard != self._shard:
            self._open_shard(shard)
        if nbytes:
            data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._fh.write(memoryview(data))
        self._part_done += nbytes
        if self._part_done == e.nbytes:
            self._pos += 1
            self._part_done = 0

    def close(self) -> list[str]:
        """Finish: check every tensor arrived, close files, write the index.  Returns file names."""
        if self._pos != len(self.order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self.order)} tensors")
        # a shard with no tensors (empty model) still needs its header
        for i in range(self._shard + 1, len(self.shards)):
            self._open_shard(i)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {
                "metadata": {**self.index_metadata, "total_size": self.total_size},
                "weight_map": {e.name: self.files[i] for i, shard in enumerate(self.shards)
                               for e in sorted(shard, key=lambda e: e.name)},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            (self.folder / f"{self.basename}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def save_file(tensors: dict[str, torch.Tensor], path: str | Path,
              metadata: dict[str, str] | None = None) -> None:
    """Write a single safetensors file (small files: adapters, tests)."""
    path = Path(path)
    entries = [OutEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = StreamingShardWriter(path.parent, entries, max_shard_size=2**62,
                             basename=path.name.removesuffix(".safetensors"), metadata=metadata)
    for name in w.order:
        w.write(name, tensors[name])
    w.close()
