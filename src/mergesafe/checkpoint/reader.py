"""Lazy, read-only views of Hugging Face checkpoints (and, via ``adapter.py``, LoRA adapters).

``open_checkpoint(path)`` accepts a model folder with ``model.safetensors`` or shards plus
``model.safetensors.index.json``; ``.bin`` weights (``pytorch_model.bin`` or its sharded index)
only with ``allow_pickle=True``, and then through ``torch.load(weights_only=True)``.  Headers are
read and validated up front; tensor data is read on demand, one tensor at a time.

Tied embeddings: when ``tie_word_embeddings`` is true (or the file simply has no ``lm_head``
next to ``embed_tokens``), ``names()`` does not list ``lm_head.weight``; ``get()`` still answers
it with the input embedding, as transformers does when loading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from mergesafe.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from mergesafe.errors import UserError, echo

#: Files that make up a model besides its weights (copied to merged outputs, hashed in manifests).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)

_TIE_PAIRS = (("lm_head.weight", "model.embed_tokens.weight"),
              ("lm_head.weight", "transformer.wte.weight"),
              ("embed_out.weight", "gpt_neox.embed_in.weight"))


class Checkpoint:
    """A checkpoint on disk, read lazily.

    Attributes: ``dir`` (folder), ``config`` (``config.json`` as a dict, ``{}`` if absent),
    ``kind`` (``"safetensors"`` or ``"bin"``).  Methods: ``names()``, ``shape(name)``,
    ``dtype(name)``, ``get(name) -> torch.Tensor`` (stored dtype), ``weight_files()``,
    ``files()`` (every file the checkpoint consists of, for manifests).
    """

    is_adapter = False

    def __init__(self, folder: Path, config: dict, kind: str, weight_files: list[Path],
                 infos: dict[str, TensorInfo] | None = None,
                 bin_map: dict[str, Path] | None = None) -> None:
        self.dir = folder
        self.config = config
        self.kind = kind
        self._weight_files = weight_files
        self._infos = infos or {}
        self._bin_map = bin_map or {}
        self._bin_cache: tuple[Path, dict] | None = None
        self._fds: dict[Path, int] = {}
        stored = list(self._infos) if kind == "safetensors" else list(self._bin_map)
        self._aliases: dict[str, str] = {}
        tie = _tie_flag(config)
        names = list(stored)
        for head, embed in _TIE_PAIRS:
            if embed in stored and (tie is True or (tie is None and head not in stored)):
                if head in names:
                    names.remove(head)  # redundant copy of a tied weight
                self._aliases[head] = embed
        self._names = names

    # -- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order (a tied ``lm_head`` is not listed)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names or name in self._aliases

    def _resolve(self, name: str) -> str:
        if name in self._names:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UserError(f"tensor {name!r} not found", self.dir)

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(self._resolve(name))

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._resolve(name)
        if self.kind == "safetensors":
            return self._infos[name].shape
        return tuple(self._bin_tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        name = self._resolve(name)
        if self.kind == "safetensors":
            return self._infos[name].dtype
        return self._bin_tensor(name).dtype

    @property
    def tied(self) -> bool:
        return bool(self._aliases)

    def model_dtype(self) -> torch.dtype:
        """The dtype of most floating-point parameters (by element count)."""
        counts: dict[torch.dtype, int] = {}
        for n in self._names:
            dt = self.dtype(n)
            if dt.is_floating_point:
                shape = self.shape(n)
                counts[dt] = counts.get(dt, 0) + int(torch.Size(shape).numel())
        return max(counts, key=counts.get) if counts else torch.float32

    # -- data -----------------------------------------------------------------------------
    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (stored dtype, freshly allocated, no mmap); ``rows=(start, stop)``
        reads only those rows of its first dimension."""
        name = self._resolve(name)
        if self.kind == "safetensors":
            info = self._infos[name]
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            return read_tensor(info, fd, rows)
        t = self._bin_tensor(name)
        return (t if rows is None else t[rows[0]:rows[1]]).clone()

    def _bin_tensor(self, name: str) -> torch.Tensor:
        path = self._bin_map[name]
        if self._bin_cache is None or self._bin_cache[0] != path:
            self._bin_cache = (path, _load_bin(path))
        return self._bin_cache[1][name]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self._names:
            yield n, self.get(n)

    def weight_files(self) -> list[Path]:
        return list(self._weight_files)

    def files(self) -> list[Path]:
        """Every file this checkpoint consists of: weights, index, config, tokenizer."""
        out = list(self._weight_files)
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                     *CONFIG_FILES, *TOKENIZER_FILES):
            p = self.dir / name
            if p.is_file() and p not in out:
                out.append(p)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._bin_cache = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.dir)!r}, {len(self._names)} tensors, {self.kind})"


def _tie_flag(config: dict) -> bool | None:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return None


def _load_bin(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is bad input
        raise UserError(f"cannot load with torch.load(weights_only=True): {err}".splitlines()[0],
                        path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("not a state dict of tensors", path)
    return obj


MAX_JSON_BYTES = 100 * 1024 * 1024  # config, index, adapter config: far below this in practice


def read_json(path: Path) -> dict:
    """A JSON object from a model's metadata file (at most ``MAX_JSON_BYTES``), or UserError."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{size} bytes is too large for a JSON metadata file "
                            f"(limit {MAX_JSON_BYTES})", path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror or err}", path) from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise UserError(f"invalid JSON: {str(err)[:200]}", path) from None
    if not isinstance(data, dict):
        raise UserError("invalid JSON: expected an object", path)
    return data


def _load_index(index_path: Path) -> dict[str, Path]:
    index = read_json(index_path)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise UserError("index has no weight_map", index_path)
    out = {}
    for name, fname in wm.items():
        p = index_path.parent / _contained_name(fname, index_path)
        if not p.is_file():
            raise UserError(f"shard {echo(fname, 80)} listed in the index is missing", index_path)
        out[str(name)] = p
    return out


def _contained_name(fname: object, index_path: Path) -> str:
    """A shard file name from an index: a relative path inside the index's folder.

    Absolute paths and ``..`` are refused (they would read other models' shards or any file);
    symlinked shards inside the folder (the Hugging Face cache layout) are fine."""
    if not isinstance(fname, str) or not fname or "\x00" in fname:
        raise UserError(f"index weight_map value {echo(fname, 80)} is not a file name", index_path)
    rel = Path(fname)
    if rel.is_absolute() or ".." in rel.parts or fname.startswith("~"):
        raise UserError(f"index weight_map points outside the model folder: {echo(fname, 80)}",
                        index_path)
    return fname


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open a Hugging Face model folder lazily (see :func:`_open_checkpoint`); an OS error
    (a name too long for the file system, a folder that cannot be listed) is a UserError."""
    try:
        return _open_checkpoint(path, allow_pickle)
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror or err}", err.filename or path) from None


def _open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open a Hugging Face model folder lazily.  Raises :class:`UserError` for anything unusable.

    Accepted: ``model.safetensors``; shards + ``model.safetensors.index.json``; with
    ``allow_pickle`` also ``pytorch_model.bin`` or its shards + ``pytorch_model.bin.index.json``
    (loaded with ``torch.load(weights_only=True)``).  A PEFT adapter folder is refused here
    (use :func:`mergesafe.checkpoint.open_adapter`).
    """
    folder = Path(path).expanduser().absolute()
    if not folder.exists():
        raise UserError("no such file or folder", folder)
    if folder.is_file():
        if folder.suffix == ".safetensors" or folder.suffix in (".bin", ".pt", ".pth"):
            raise UserError("expected a model folder (with config.json and weights), got a file",
                            folder)
        raise UserError("expected a model folder, got a file", folder)
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}

    st_index = folder / "model.safetensors.index.json"
    st_single = folder / "model.safetensors"
    if st_index.is_file():
        mapping = _load_index(st_index)
        files = sorted(set(mapping.values()))
        infos: dict[str, TensorInfo] = {}
        for f in files:
            header, _ = read_header(f)
            for name, info in header.items():
                if mapping.get(name) == f:
                    infos[name] = info
        missing = [n for n in mapping if n not in infos]
        if missing:
            raise UserError(f"tensor {missing[0]!r} listed in the index is not in shard "
                            f"{mapping[missing[0]].name}", st_index)
        # order by (file, offset): file order is the natural streaming order
        ordered = dict(sorted(infos.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)))
        return Checkpoint(folder, config, "safetensors", files, infos=ordered)
    if st_single.is_file():
        header, _ = read_header(st_single)
        ordered = dict(sorted(header.items(), key=lambda kv: kv[1].offset))
        return Checkpoint(folder, config, "safetensors", [st_single], infos=ordered)

    bin_index = folder / "pytorch_model.bin.index.json"
    bin_single = folder / "pytorch_model.bin"
    if bin_index.is_file() or bin_single.is_file():
        where = bin_index if bin_index.is_file() else bin_single
        if not allow_pickle:
            raise UserError(f"{where.name} holds pickled weights, which can run code when loaded; "
                            "refused without --allow-pickle (convert to safetensors, or pass "
                            "--allow-pickle to load them with torch.load(weights_only=True))", folder)
        if bin_index.is_file():
            mapping = _load_index(bin_index)
            files = sorted(set(mapping.values()))
        else:
            files = [bin_single]
            mapping = {name: bin_single for name in _load_bin(bin_single)}
        return Checkpoint(folder, config, "bin", files, bin_map=mapping)

    if (folder / "adapter_config.json").is_file():
        raise UserError("this is a PEFT adapter folder, not a model (a LoRA adapter can only be "
                        "used as --post, on top of --pre)", folder)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt",
                                                                    ".pth", ".gguf", ".ckpt"))
    hint = f" (found {', '.join(others[:3])}, which is not a supported layout)" if others else ""
    raise UserError("no model weights found: expected model.safetensors or "
                    f"model.safetensors.index.json{hint}", folder)
