"""`EvalConfig`: every setting of one evaluation (prompt sets, judge, decoding), validated by pydantic.

Defaults follow the paper's protocol (Farn et al., arXiv 2412.19512): greedy decoding,
512 new tokens, repetition penalty 1.2.  The judge defaults to the keyword rule, a proxy (see
`judges/keyword.py`); the paper's judge is WildGuard (`wildguard:PATH`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """What to evaluate and how.  Paths are local; nothing is downloaded."""

    model_config = ConfigDict(extra="forbid")

    safety: list[Path] = Field(default_factory=list, description="harmful prompt sets (ASR)")
    over_refusal: list[Path] = Field(default_factory=list, description="benign prompt sets (refusal rate)")
    task: list[tuple[Path, str]] = Field(default_factory=list, description="(task file, scorer name)")
    judge: str = Field("keyword", description="keyword | llama-guard:PATH | wildguard:PATH | harmbench:PATH")
    limit: int | None = Field(None, ge=1, description="keep the first N prompts of each set")
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
    # A permission to read the model's files, not a setting of the evaluation: left out of
    # model_dump (sweep result keys hash the dump, so they stay the same as before).
    allow_pickle: bool = Field(False, exclude=True,
                               description="accept .bin (pickle) weights, loaded with "
                                           "torch.load(weights_only=True)")
