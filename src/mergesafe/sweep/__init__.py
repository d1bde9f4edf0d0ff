"""mergesafe.sweep: methods × λ evaluated in memory, resumable results, Pareto front, recommendation.

The package itself is callable: `mergesafe.sweep(...)` is `mergesafe.sweep.api.sweep(...)`.
"""

from mergesafe._callable import make_callable

make_callable(__name__, "mergesafe.sweep.api", "sweep")
