"""mergesafe.finetune: supervised fine-tuning (LoRA or full) of a chat model into the post model.

`finetune(model, data, out, config=None, **overrides)` (in `api.py`) and `FinetuneConfig`
(in `config.py`); the pieces: `data` (loading, format detection), `tokenize` (chat template,
assistant-only labels), `trainer` (transformers Trainer + peft), `workdir` (OUT.partial,
resume, atomic rename), `callbacks` (train_log.jsonl, progress bar).  The package itself is
callable: `mergesafe.finetune(...)` is `mergesafe.finetune.api.finetune(...)`.
"""

from mergesafe._callable import make_callable
from mergesafe.finetune.api import finetune
from mergesafe.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]

make_callable(__name__, "mergesafe.finetune.api", "finetune")
