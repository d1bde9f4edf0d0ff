"""One small pure function per merge method, over float32 tensors (mergekit 0.1.5 semantics).

Each module's docstring gives the formula, the source and the defaults.  The registry
(:mod:`mergesafe.merge.registry`) maps mergekit names to these functions and their parameters.
"""

from mergesafe.merge.methods.breadcrumbs import breadcrumbs
from mergesafe.merge.methods.breadcrumbs_ties import breadcrumbs_ties
from mergesafe.merge.methods.dare_linear import dare_linear
from mergesafe.merge.methods.dare_ties import dare_ties
from mergesafe.merge.methods.della import della
from mergesafe.merge.methods.della_linear import della_linear
from mergesafe.merge.methods.linear import linear
from mergesafe.merge.methods.model_stock import model_stock
from mergesafe.merge.methods.slerp import slerp
from mergesafe.merge.methods.task_arithmetic import task_arithmetic
from mergesafe.merge.methods.ties import ties

__all__ = ["breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
           "linear", "model_stock", "slerp", "task_arithmetic", "ties"]
