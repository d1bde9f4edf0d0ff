"""mergesafe: restore the safety of fine-tuned LLMs by merging pre- and post-tuning weights.

Reference: Farn et al., "Safeguard Fine-Tuned LLMs Through Pre- and Post-Tuning Model
Merging" (arXiv 2412.19512).  The public API is imported lazily so that `import mergesafe`
stays cheap for the command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Each stage's package is callable (see `_callable.py`): `mergesafe.merge(...)` runs a merge.
_STAGES = ("merge", "finetune", "evaluate", "sweep")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _STAGES:
        return importlib.import_module(f"mergesafe.{name}")
    if name == "UserError":
        return importlib.import_module("mergesafe.errors").UserError
    raise AttributeError(f"module 'mergesafe' has no attribute {name!r}")


__all__ = [*_STAGES, "UserError", "__version__"]
