"""Make a stage's package callable, so `mergesafe.merge(...)`, `mergesafe.finetune(...)`,
`mergesafe.evaluate(...)` and `mergesafe.sweep(...)` call the stage's API function however the
package was imported (a plain function attribute would be replaced by the subpackage as soon as
any of its modules is imported).  Uses module `__class__` assignment (Python >= 3.5).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(package: str, module: str, function: str) -> None:
    """Calling the package `package` calls `module.function` (imported on first call)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(module), function)(*args, **kwargs)

    _CallablePackage.__call__.__doc__ = f"Call {module}.{function}."
    sys.modules[package].__class__ = _CallablePackage
