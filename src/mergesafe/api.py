"""The Python API above the stages: what ``mergesafe.merge(...)`` and ``mergesafe.sweep(...)`` run.

* :func:`merge` -- one entry point for every method: the mergekit methods go to
  :func:`mergesafe.merge.api.merge`, the safety-restoration methods (``safe_lora``,
  ``safemerge``, ``resta``) to :func:`mergesafe.restore.apply.restore_merge`.  The dispatch
  lives here, above both packages, so neither imports the other's API.
* :func:`sweep` -- :func:`mergesafe.sweep.api.sweep`, then the HTML report of its results
  (:mod:`mergesafe.report`), as the ``mergesafe sweep`` command does.

The packages themselves are callable (``mergesafe.merge(...)`` is :func:`merge` here), so the
commands and the Python API give the same results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

PathLike = str | Path


def merge(pre: PathLike, post: PathLike | Sequence[PathLike], out: PathLike,
          method: str = "linear", *args: Any, unaligned: PathLike | None = None,
          safety_adapter: PathLike | None = None, harmful: PathLike | None = None,
          **kwargs: Any) -> Path:
    """Merge ``pre`` and ``post`` into ``out`` with ``method`` (any mergekit method, or a
    safety-restoration method with its extra input ``unaligned``, ``safety_adapter`` or
    ``harmful``).  Other arguments: see :func:`mergesafe.merge.api.merge` and
    :func:`mergesafe.restore.apply.restore_merge`.  Returns ``out``."""
    from mergesafe.errors import UserError
    from mergesafe.restore.params import RESTORE_METHODS

    if method not in RESTORE_METHODS:
        for flag, value in (("unaligned", unaligned), ("safety_adapter", safety_adapter),
                            ("harmful", harmful)):
            if value is not None:
                raise UserError(f"--{flag.replace('_', '-')} is only used by the safety-"
                                f"restoration methods ({', '.join(RESTORE_METHODS)}), not {method}")
        from mergesafe.merge.api import merge as merge_weights

        return merge_weights(pre, post, out, method, *args, **kwargs)
    return _restore(pre, post, out, method, unaligned=unaligned, safety_adapter=safety_adapter,
                    harmful=harmful, **kwargs)


def _restore(pre: PathLike, post: PathLike | Sequence[PathLike], out: PathLike, method: str, *,
             params: dict | None = None, weight: Any = None,  # noqa: ARG001 - not used
             anchor: PathLike | None = None,
             out_format: str = "full", **kwargs: Any) -> Path:
    """``merge`` for the safety-restoration methods: one post, no anchor, a full model out."""
    from mergesafe.errors import UserError
    from mergesafe.restore.apply import restore_merge

    posts = [post] if isinstance(post, (str, Path)) else list(post)
    if len(posts) != 1:
        raise UserError(f"{method} takes exactly one --post, got {len(posts)}")
    if anchor is not None:
        raise UserError(f"--anchor is only used by model_stock, not {method}")
    if out_format != "full":
        raise UserError(f"--out-format {out_format} is not available for {method} (only 'full')")
    return restore_merge(pre, posts[0], out, method, params, **kwargs)


def sweep(pre: PathLike, post: PathLike | list[PathLike], out: PathLike, **kwargs: Any) -> Any:
    """:func:`mergesafe.sweep.api.sweep` (same arguments), then ``OUT/report.html`` and
    ``OUT/frontier.png``.  Returns the :class:`~mergesafe.sweep.api.SweepResult`."""
    from mergesafe.report import write_sweep_report
    from mergesafe.sweep.api import sweep as run_sweep

    result = run_sweep(pre, post, out, **kwargs)
    write_sweep_report(result)
    return result
