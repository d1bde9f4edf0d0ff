"""`EvalConfig`: every setting of one evaluation (prompt sets, judge, decoding), validated by pydantic.

Defaults follow the paper's protocol (Farn et al., arXiv 2412.19512): greedy decoding,
512 new tokens, repetition penalty 1.2.  The judge defaults to the keyword rule, a proxy (see
`judges/keyword.py`); the paper's judge is WildGuard (`wildguard:PATH`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """What to evaluate and how.  Paths are local; nothing is downloaded."""

    model_config = ConfigDict(extra="forbid")

    safety: list[Path] = Field(default_factory=list, description="harmful prompt sets (ASR)")
    over_refusal: list[Path] = Field(default_factory=list, description="benign prompt sets (refusal rate)")
    task: list[tuple[Path, str]] = Field(default_factory=list, description="(task file, scorer name)")
    judge: str = Field("keyword", description="keyword | llama-guard:PATH | wildguard:PATH | harmbench:PATH")
    limit: int | None = Field(None, ge=1, description="keep the first N prompts of each set")
    set_limits: dict[str, int] = Field(default_factory=dict,
                                       description="per-set limits: set name (file stem) or kind "
                                                   "('safety', 'over-refusal', 'task') → N; over `limit`")
    sample: int | None = Field(None, ge=1, description="keep N prompts of each set drawn at random")
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    repetition_penalty: float = Field(1.2, gt=0)
    system_prompt: str | None = None
    prompt_column: str | None = None
    category_column: str | None = None
    reference_column: str | None = None
    backend: Literal["transformers", "vllm"] = "transformers"
    progress: bool = False
    judge_batch_size: int = Field(8, ge=1)
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    # lm-evaluation-harness tasks run on the model in memory (`evaluate/harness.py`); results
    # under `task` as `lm-eval:TASK:METRIC`.
    lm_eval: list[str] = Field(default_factory=list,
                               description="lm-eval task, group or tag names (registry or lm_eval_include)")
    lm_eval_include: Path | None = Field(None, description="folder of extra lm-eval task YAMLs")
    # Sampled decoding of task sets (safety and over-refusal sets stay greedy).  The paper's
    # HumanEval protocol: num_samples=50, temperature=0.6, top_p=0.9, top_k=50, pass_k=[10].
    num_samples: int = Field(1, ge=1, le=1000, description="samples per task prompt")
    temperature: float = Field(0.0, ge=0.0, le=100.0,
                               description="task-set sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (1 = off)")
    top_k: int | None = Field(None, ge=1, description="top-k sampling (None = off)")
    # HumanEval: pass@k for every k; `score` is pass@ the first k.
    pass_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 10], min_length=1)
    humaneval_timeout: float = Field(3.0, gt=0.0, le=3600.0, description="seconds per sample")
    # How many samples run at once: a resource, not a setting of the result (left out of keys).
    humaneval_workers: int | None = Field(None, ge=1, le=256, exclude=True,
                                          description="parallel sandboxed samples (default: CPU count)")
    # `--scorer bertscore` (scorers/bertscore.py): F1 against the reference; the paper uses
    # microsoft/deberta-xlarge-mnli, layer 40 (the default for that model), no rescaling.
    bertscore_model: Path | None = Field(None, description="local BERTScore model folder")
    bertscore_layer: int | None = Field(None, ge=0, le=1000,
                                        description="layer (default: bert_score's for the model)")
    bertscore_rescale: bool = Field(False, description="rescale F1 with bert_score's baseline")
    # A permission to read the model's files, not a setting of the evaluation: left out of
    # model_dump (sweep result keys hash the dump, so they stay the same as before).
    allow_pickle: bool = Field(False, exclude=True,
                               description="accept .bin (pickle) weights, loaded with "
                                           "torch.load(weights_only=True)")
