"""Copy the non-weight files of a model folder: config, generation config, tokenizer, chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mergesafe.checkpoint.reader import TOKENIZER_FILES

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer_config.json").is_file() and any(
        (folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                         "vocab.txt", "spiece.model"))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files and chat template from ``src`` to ``dst``; return the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    return copied


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """Record ``dtype`` in a config dict under the key(s) it already uses (``dtype`` in
    transformers >= 5, ``torch_dtype`` before), or ``torch_dtype`` when it has neither."""
    if dtype is None or dtype not in DTYPE_NAMES:
        return config
    name = DTYPE_NAMES[dtype]
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
    return config


def copy_model_files(config: dict[str, Any] | None, dst: str | Path, *,
                     tokenizer_src: str | Path | None = None,
                     generation_src: list[str | Path] | tuple = (),
                     dtype: torch.dtype | None = None,
                     overrides: dict[str, Any] | None = None) -> list[str]:
    """Write ``config.json`` (``config`` with ``overrides`` and ``dtype`` applied), copy
    ``generation_config.json`` from the first folder of ``generation_src`` that has one, and the
    tokenizer files from ``tokenizer_src``.  Returns the file names written."""
    dst = Path(dst)
    written = []
    if config:
        cfg = dict(config)
        cfg.update(overrides or {})
        set_config_dtype(cfg, dtype)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
    for src in generation_src:
        p = Path(src) / "generation_config.json"
        if p.is_file():
            shutil.copyfile(p, dst / "generation_config.json")
            written.append("generation_config.json")
            break
    if tokenizer_src is not None:
        written += copy_tokenizer_files(tokenizer_src, dst)
    return written
