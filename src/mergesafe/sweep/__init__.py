"""mergesafe.sweep: methods × λ evaluated in memory, resumable results, Pareto front, recommendation.

The package itself is callable: `mergesafe.sweep(...)` is `mergesafe.api.sweep(...)` (the sweep
of `mergesafe.sweep.api.sweep`, then its report).
"""

from mergesafe._callable import make_callable

# The call goes to the public API above the stages (the sweep, then its report), looked up when
# called: this package never imports mergesafe.report.
make_callable(__name__, "mergesafe.api", "sweep")
