"""Settings of `mergesafe demo --real`: set sizes, each stage's budget, the sweep grid.

`RealConfig.default()` is the full run; `RealConfig.quick()` the same pipeline on a small budget
(`--quick`: checks the plumbing, not the effect).  The aligned model (pre) is cached by
`pre_key()`, a hash of everything it depends on plus `REAL_VERSION` (bump it when the code
changes what alignment trains).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from mergesafe.world.real.data import RealSizes

REAL_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """One fine-tuning stage through `mergesafe.finetune` (warm-up, cosine decay, LoRA merged
    into full weights so that every model is an ordinary checkpoint)."""

    learning_rate: float
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 32
    # peft target modules: "all-linear", or a tuple of module names (("q_proj", "v_proj") is
    # peft's default for Llama models)
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    warmup_ratio: float = 0.1

    def finetune_overrides(self) -> dict:
        targets = (self.lora_target_modules if isinstance(self.lora_target_modules, str)
                   else list(self.lora_target_modules))
        extra = ({"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "merge_adapter": True,
                  "lora_target_modules": targets} if self.lora else {})
        return {"learning_rate": self.learning_rate, "epochs": self.epochs, "max_steps": self.max_steps,
                "batch_size": self.batch_size, "warmup_ratio": self.warmup_ratio,
                "lr_scheduler": "cosine", "lora": self.lora, **extra}


@dataclass(frozen=True)
class RealConfig:
    """Everything that decides the real demo's numbers."""

    sizes: RealSizes = field(default_factory=RealSizes)
    # self-distillation: the base model's own greedy answers to the benign prompts
    distill_max_new_tokens: int = 64
    # alignment's answers to the task-like prompts: "self" (the base model's own, distilled) or
    # "plain" (the right year in a plain sentence, never the task's "Sure, ..." form)
    task_like_answers: Literal["self", "plain"] = "plain"
    # three epochs, not one: one epoch's refusal was shallow, and the task's "Sure, ..." undid it
    # at the same λ that brought the task (README, "What was tried")
    align: Budget = Budget(learning_rate=3e-4, epochs=3)
    post: Budget = Budget(learning_rate=5e-4, epochs=2, lora_r=8, lora_alpha=16)
    max_length: int = 256
    methods: tuple[str, ...] = ("linear", "ties")
    method_params: tuple[tuple[str, str, float], ...] = (("ties", "density", 0.5),)
    weights: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    max_new_tokens: int = 24
    repetition_penalty: float = 1.2
    eval_batch_size: int = 32
    # the recommendation keeps merges within these of pre's ASR / over-refusal
    asr_tolerance: float = 0.10
    refusal_tolerance: float = 0.10

    @classmethod
    def default(cls) -> RealConfig:
        return cls()

    @classmethod
    def quick(cls) -> RealConfig:
        """The same pipeline in a few minutes: small sets, a few optimiser steps, one λ."""
        base = cls()
        return replace(
            base,
            sizes=RealSizes(align_harmful=12, align_benign=8, align_task_like=4, task_train=12,
                            task_val=5, task_test=5, eval_harmful=10, eval_over_refusal=5),
            distill_max_new_tokens=16,
            align=replace(base.align, epochs=1, max_steps=3, batch_size=4),
            post=replace(base.post, epochs=1, max_steps=2, batch_size=4),
            weights=(0.5,),
            max_new_tokens=12,
        )

    def pre_key(self, seed: int, model_key: str) -> str:
        """Hash of what pre depends on: the base model, the alignment data sizes, the
        distillation length, the alignment budget, the seed and `REAL_VERSION`."""
        sizes = {k: v for k, v in asdict(self.sizes).items() if k.startswith("align_")}
        blob = json.dumps({"version": REAL_VERSION, "seed": seed, "model": model_key, "sizes": sizes,
                           "distill": self.distill_max_new_tokens, "align": asdict(self.align),
                           **({} if self.task_like_answers == "self" else {"task_like": self.task_like_answers}),
                           "max_length": self.max_length}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
