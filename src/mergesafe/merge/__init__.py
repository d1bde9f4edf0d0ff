"""mergesafe.merge: merge methods, the streaming engine and the Python API.

``mergesafe.merge(...)`` is the merge function (:func:`mergesafe.merge.api.merge`); this package
module is itself callable so that ``mergesafe.merge(...)`` works however it was imported.
In-memory merging for sweeps: :func:`mergesafe.merge.engine.merge_tensor`;
parameters: :func:`mergesafe.merge.registry.validate_params`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("merge", "merge_config"):
        from mergesafe.merge import api

        return getattr(api, name)
    if name == "merge_tensor":
        from mergesafe.merge.engine import merge_tensor

        return merge_tensor
    if name in ("validate_params", "get_method", "METHODS"):
        from mergesafe.merge import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mergesafe.merge' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """Make ``mergesafe.merge(...)`` call :func:`mergesafe.merge.api.merge`."""

    def __call__(self, *args: Any, **kwargs: Any):
        from mergesafe.merge.api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
