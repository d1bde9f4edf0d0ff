"""Safety-restoration kernels compared beside the pre/post merge (issue 7).

One small pure function (or a few) per method, over float32 tensors; each module's docstring
gives the formula, the paper and the defaults.  The kernels do no I/O: ``apply.py`` streams
them over whole checkpoints (``mergesafe merge --method safe_lora|safemerge|resta``),
``harden.py`` is ``mergesafe harden`` (LoX), and ``finetune --ema`` calls :func:`ema_update_`.

* :mod:`.safe_lora` -- Safe LoRA (Hsu et al. 2024): project the least safety-aligned updates.
* :mod:`.safemerge` -- SafeMERGE (Djuhera et al. 2025): blend with a safety adapter's update.
* :mod:`.resta` -- RESTA (Bhardwaj et al. 2024): add a scaled safety vector, optional DARE.
* :mod:`.lox` -- LoX (Perin et al. 2025): extrapolate the top-k alignment directions.
* :mod:`.ema` -- EMA in parameter space (Kim et al. 2025).
"""

from mergesafe.restore.ema import ema_update_
from mergesafe.restore.lox import lox_harden
from mergesafe.restore.resta import resta
from mergesafe.restore.safe_lora import (alignment_matrix, alignment_projector, lora_update_cosine,
                                         project_lora_update, project_update, projection_cosine,
                                         safe_lora_update, select_layers, update_cosine)
from mergesafe.restore.safemerge import safemerge_update

__all__ = ["alignment_matrix", "alignment_projector", "ema_update_", "lox_harden",
           "lora_update_cosine", "project_lora_update", "project_update", "projection_cosine",
           "resta", "safe_lora_update", "safemerge_update", "select_layers", "update_cosine"]
