"""mergesafe.merge: merge methods, the merge engine and the Python API of the mergekit methods.

``mergesafe.merge(...)`` is :func:`mergesafe.api.merge` (every method, the safety-restoration
ones included); this package module is itself callable so that ``mergesafe.merge(...)`` works
however it was imported.  :func:`mergesafe.merge.api.merge` runs the mergekit methods.
In-memory merging for sweeps: :func:`mergesafe.merge.engine.merge_tensor`;
parameters: :func:`mergesafe.merge.registry.validate_params`.
"""

from __future__ import annotations

from typing import Any

from mergesafe._callable import make_callable


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


# The call goes to the public API above the stages (merge + restoration methods), looked up when
# called: this package never imports mergesafe.restore.
make_callable(__name__, "mergesafe.api", "merge")
