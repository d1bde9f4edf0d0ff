"""`EvalConfig`: every setting of one evaluation (prompt sets, judge, decoding), validated by pydantic.

Defaults follow the paper's protocol (Farn et al., arXiv 2412.19512): greedy decoding,
512 new tokens, repetition penalty 1.2.  The judge defaults to the keyword rule, a proxy (see
`judges/keyword.py`); the paper's judge is WildGuard (`wildguard:PATH`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class EvalConfig(BaseModel):
    """What to evaluate and how.  Paths are local; nothing is downloaded."""

    model_config = ConfigDict(extra="forbid")

    safety: list[Path] = Field(default_factory=list, description="harmful prompt sets (ASR)")
    over_refusal: list[Path] = Field(default_factory=list, description="benign prompt sets (refusal rate)")
    task: list[tuple[Path, str]] = Field(default_factory=list, description="(task file, scorer name)")
    judge: str = Field("keyword", description="keyword | llama-guard:PATH | wildguard:PATH | harmbench:PATH | "
                                              "FORMAT@URL (an OpenAI-compatible chat endpoint; FORMAT: "
                                              "wildguard, llama-guard, harmbench, gpt)")
    # The served model of a FORMAT@URL judge (None: the first one the endpoint lists).  Left out of
    # model_dump while None, so the sweep keys of every other judge stay as they were.  The
    # endpoint's key is never a setting: it is read from MERGESAFE_JUDGE_API_KEY.
    judge_model: str | None = Field(None, min_length=1, max_length=256,
                                    description="model of a FORMAT@URL judge (default: the first listed)")
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
    # The vLLM engine's settings (`--backend vllm` only: refused with transformers; see
    # evaluate/vllm_engine.py).  None: vLLM's default, except dtype: float32 on CPU, the
    # checkpoint's on CUDA.  Left out of model_dump while None (`_DROP_WHEN_NONE`).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="vLLM dtype (default: float32 on CPU, the checkpoint's on CUDA)")
    max_model_len: int | None = Field(None, ge=16, le=10_000_000,
                                      description="vLLM context length (default: the model's)")
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0,
                                                 description="share of GPU memory vLLM takes")
    tensor_parallel_size: int | None = Field(None, ge=1, le=1024, description="GPUs per vLLM engine")
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

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler):
        """The dump without the optional settings that are None (`_DROP_WHEN_NONE`)."""
        data = handler(self)
        if isinstance(data, dict):
            for name in _DROP_WHEN_NONE:
                if data.get(name, 0) is None:
                    del data[name]
        return data


# Fields added after sweep keys existed: omitted from model_dump while None (keys stay the same).
_DROP_WHEN_NONE: tuple[str, ...] = ("judge_model", "dtype", "max_model_len", "gpu_memory_utilization",
                                    "tensor_parallel_size")
