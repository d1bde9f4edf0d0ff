"""Loading a model folder into transformers (and peft) for training, generation or judging.

One loader for ``finetune``, ``eval``, ``sweep`` and the model judges, so every command gets the
same checks before transformers sees a folder:

* the weights are opened with :func:`mergesafe.checkpoint.open_checkpoint` first, which validates
  every safetensors header and shard (a corrupt, truncated or mis-indexed checkpoint is one
  :class:`UserError` line, not a ``SafetensorError`` traceback), and refuses pickled ``.bin``
  weights unless ``allow_pickle``;
* ``auto_map`` (custom code) is refused and ``trust_remote_code`` is always False;
* the device is checked (``--device cuda`` on a machine without CUDA is one line);
* transformers' own "Loading weights" bars are silenced (:func:`no_hf_progress_bars`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mergesafe.checkpoint.adapter import open_adapter
from mergesafe.checkpoint.inputs import open_model, refuse_remote_code
from mergesafe.errors import UserError, one_line

PathLike = str | Path
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights"/"Writing model shards" bars (ours is enough)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def resolve_device(device: str | None) -> torch.device:
    """``None`` → cuda when available, else cpu; an unavailable or malformed device is a
    :class:`UserError` (``--device``)."""
    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {str(device)[:40]!r} (cpu, cuda, cuda:1, mps ...)",
                        "--device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available on this machine (this torch build or driver "
                            "has none); use --device cpu", "--device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{dev} does not exist: {torch.cuda.device_count()} CUDA device(s)",
                            "--device")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError("MPS is not available on this machine; use --device cpu", "--device")
    elif dev.type != "cpu":
        raise UserError(f"device type {dev.type!r} is not supported (cpu, cuda, mps)", "--device")
    return dev


def has_tokenizer_files(folder: PathLike) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_MARKERS)


def load_tokenizer(folder: PathLike) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local folder, without custom code."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not has_tokenizer_files(folder):
        raise UserError("model folder has no tokenizer (tokenizer.json / tokenizer_config.json)",
                        folder)
    refuse_remote_code(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure to load is bad input
        raise UserError(f"cannot load the tokenizer ({_first_line(err)})", folder) from None


def load_causal_lm(path: PathLike, *, dtype: Any = torch.float32, device: str | None = None,
                   allow_pickle: bool = False, adapter: PathLike | None = None) -> Any:
    """A validated model folder (plus, optionally, a PEFT LoRA adapter of it) as a
    ``transformers`` causal LM on ``device`` (``None``: left where transformers puts it).

    Headers and shards are validated, pickles refused without ``allow_pickle``, ``config.json``
    required and custom code refused before transformers reads anything."""
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError("model folder not found" if not p.exists() else
                        "expected a model folder, got a file", p)
    ck = open_model(p, allow_pickle=allow_pickle)  # validates headers, shards, config, code
    dev = resolve_device(device) if device is not None else None
    if adapter is not None:
        adapter = Path(adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise UserError("adapter folder not found or has no adapter_config.json", adapter)
        refuse_remote_code(adapter)
        open_adapter(adapter, ck, allow_pickle=allow_pickle)  # fits the model, or one line
    ck.close()
    safetensors_only = not allow_pickle or _has_safetensors(p)
    try:
        with no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                str(p), dtype=dtype, trust_remote_code=False,
                use_safetensors=True if safetensors_only else None)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to load is bad input
        raise UserError(f"cannot load the model ({type(err).__name__}: {_first_line(err)})",
                        p) from None
    if dev is not None:
        model = model.to(dev)
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot load the adapter ({type(err).__name__}: {_first_line(err)})",
                            adapter) from None
        if dev is not None:
            model = model.to(dev)
    return model


def load_for_generation(path: PathLike, adapter: PathLike | None = None, device: str | None = None,
                        allow_pickle: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode: float32 on CPU, the saved dtype on CUDA.  The
    tokenizer is the adapter's when it has one, else the model's."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError("model folder not found" if not p.exists() else
                        "expected a model folder, got a file", p)
    dev = resolve_device(device)
    tok_dir = p
    if adapter is not None and has_tokenizer_files(adapter):
        tok_dir = Path(adapter)
    tokenizer = load_tokenizer(tok_dir)
    dtype = "auto" if dev.type == "cuda" else torch.float32
    model = load_causal_lm(p, dtype=dtype, device=str(dev), allow_pickle=allow_pickle,
                           adapter=adapter)
    model.eval()
    return model, tokenizer


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _first_line(err: BaseException) -> str:
    return one_line((str(err).strip().splitlines() or [""])[0], 300)
