"""mergesafe: restore the safety of fine-tuned LLMs by merging pre- and post-tuning weights.

Reference: Farn et al., "Safeguard Fine-Tuned LLMs Through Pre- and Post-Tuning Model
Merging" (arXiv 2412.19512).  The public API is imported lazily so that `import mergesafe`
stays cheap for the command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": ("mergesafe.merge.api", "merge"),
    "finetune": ("mergesafe.finetune.api", "finetune"),
    "evaluate": ("mergesafe.evaluate.api", "evaluate"),
    "sweep": ("mergesafe.sweep.api", "sweep"),
    "UserError": ("mergesafe.errors", "UserError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergesafe' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
