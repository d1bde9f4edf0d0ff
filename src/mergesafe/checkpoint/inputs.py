"""Opening and checking the model folders a command is given, in one place for every command.

* :func:`check_not_input` -- an output path is compared with every input by *resolved* path
  (symlinks, ``..``), so no command can write into, over, or around one of its inputs.
* :func:`refuse_remote_code` -- a folder whose ``config.json`` or ``tokenizer_config.json`` has
  ``auto_map`` asks for custom Python code; mergesafe never runs it (``trust_remote_code`` is
  always False) and says so in one line.
* :func:`open_model` / :func:`open_model_or_adapter` -- a full model folder (validated headers,
  ``config.json`` required) or a PEFT LoRA adapter of pre seen as full weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from mergesafe.checkpoint.adapter import AdapterView, is_adapter_dir, open_adapter
from mergesafe.checkpoint.reader import Checkpoint, open_checkpoint
from mergesafe.errors import UserError

PathLike = str | Path


def resolved(path: PathLike) -> Path:
    """``path`` with ``~``, symlinks and ``..`` resolved (it need not exist)."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise UserError(f"cannot resolve the path: {err}", path) from None


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None], *,
                    may_contain: bool = False) -> None:
    """Refuse an output that is, contains, or lies inside one of the ``inputs`` (resolved paths).

    ``--out p2/../p1``, a symlinked parent, or ``--out p1/sub`` all reach p1: writing there
    (or replacing it with ``--overwrite``) would modify an input.  ``may_contain``: the command
    only adds files to OUT and never replaces it (``sweep``), so OUT may hold an input.
    """
    o = resolved(out)
    for p in inputs:
        if p is None:
            continue
        r = resolved(p)
        if o == r:
            raise UserError(f"the output is the input folder {p} (inputs are never modified)", out)
        if r.is_relative_to(o) and not may_contain:
            raise UserError(f"the output folder contains the input {p} (inputs are never "
                            "modified)", out)
        if o.is_relative_to(r) and r.is_dir():
            raise UserError(f"the output lies inside the input folder {p} (inputs are never "
                            "modified)", out)


def _auto_map(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable files are reported by whoever reads them
    if not isinstance(data, dict):
        return False
    nested = [data.get(k) for k in ("text_config", "vision_config")]
    return bool(data.get("auto_map")) or any(isinstance(n, dict) and n.get("auto_map")
                                             for n in nested)


def refuse_remote_code(folder: PathLike) -> None:
    """A folder that asks for custom code (``auto_map``) is refused: it is never run."""
    folder = Path(folder)
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        if _auto_map(folder / name):
            raise UserError(f"{name} has 'auto_map': this model needs custom Python code "
                            "(trust_remote_code), which mergesafe never runs", folder)


def _exists(path: PathLike, flag: str | None) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        where = f" (given as {flag})" if flag else ""
        raise UserError(f"no such file or folder{where}", p)
    return p


def open_model(path: PathLike, flag: str | None = None, allow_pickle: bool = False, *,
               require_config: bool = True) -> Checkpoint:
    """A full model folder given as ``flag``: headers validated, ``config.json`` present (the
    output of a merge needs one), no custom code.  A PEFT adapter folder is refused."""
    p = _exists(path, flag)
    if is_adapter_dir(p):
        what = f"{flag} must be" if flag else "expected"
        raise UserError(f"{what} a full model folder, not a PEFT adapter", p)
    ck = open_checkpoint(p, allow_pickle=allow_pickle)
    if require_config and not (Path(ck.dir) / "config.json").is_file():
        raise UserError("model folder has no config.json (the architecture would be unknown)",
                        ck.dir)
    refuse_remote_code(ck.dir)
    return ck


def open_model_or_adapter(path: PathLike, pre: Checkpoint, flag: str | None = None,
                          allow_pickle: bool = False) -> Checkpoint | AdapterView:
    """A full model folder, or a PEFT LoRA adapter of ``pre`` seen as full weights."""
    p = _exists(path, flag)
    if is_adapter_dir(p):
        refuse_remote_code(p)
        return open_adapter(p, pre, allow_pickle=allow_pickle)
    return open_model(p, flag, allow_pickle)
