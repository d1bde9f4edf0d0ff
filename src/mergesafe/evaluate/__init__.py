"""mergesafe.evaluate: generation (batched, left padding), judges, scorers, prompt-set loaders, metrics.

Public API: `evaluate` (one model), `load_eval_sets` + `evaluate_loaded` (many models, sets and judge
loaded once), `evaluate_responses` (saved responses, no model), `EvalConfig`, `load_judge`.  The
package itself is callable: `mergesafe.evaluate(...)` is `mergesafe.evaluate.api.evaluate(...)`.
"""

from mergesafe._callable import make_callable
from mergesafe.checkpoint.hf_model import load_for_generation as load_model
from mergesafe.evaluate.api import EvalSets, evaluate, evaluate_loaded, load_eval_sets
from mergesafe.evaluate.config import EvalConfig
from mergesafe.evaluate.judges.registry import load_judge
from mergesafe.evaluate.responses import evaluate_responses

__all__ = ["EvalConfig", "EvalSets", "evaluate", "evaluate_loaded", "evaluate_responses", "load_eval_sets",
           "load_judge", "load_model"]

make_callable(__name__, "mergesafe.evaluate.api", "evaluate")
