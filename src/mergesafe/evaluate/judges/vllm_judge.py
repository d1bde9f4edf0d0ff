"""Model judges (`wildguard:PATH`, `llama-guard:PATH`, `harmbench:PATH`) on vLLM (`--backend vllm`).

The judge keeps its own prompt format and parser (the same `build_prompt` / `parse` /
`max_new_tokens` / BOS rule as on transformers, `judges/base.py`); only the text generation moves
to a vLLM engine on the judge's folder: the formatted texts tokenized without special tokens
(:func:`mergesafe.evaluate.generate.encode_texts`, as transformers does), greedy, no repetition
penalty, `max_tokens` = the format's answer length, stop at the judge's eos ids, decoded with
`skip_special_tokens=True`.

* The engine starts on the first `judge()` call: in `eval`, after the generator's engine was
  shut down (its memory released first).  In a sweep both engines stay up; on a GPU each then
  takes :data:`SHARED_GPU_SHARE` of its memory unless `--gpu-memory-utilization` says otherwise.
* dtype: `--dtype`, else float32 on CPU and the checkpoint's elsewhere (as the generator).
* Context: :data:`JUDGE_CONTEXT` tokens (or the model's own, if smaller): a judge's prompt plus a
  response of a few hundred tokens, without reserving a KV cache for the 128k contexts of Llama
  Guard 3 (`--max-model-len` overrides).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergesafe.evaluate.generate import Progress, encode_texts, eos_token_ids

JUDGE_CONTEXT = 8192
SHARED_GPU_SHARE = 0.45  # of the GPU's memory, for each of two engines up at once


class VllmJudgeBackend:
    """`backend(texts, max_new_tokens, progress) -> list[str]` on a vLLM engine (see the module doc)."""

    def __init__(self, path: Path, config: Any, *, shared: bool = False) -> None:
        from mergesafe.checkpoint.hf_model import load_tokenizer
        from mergesafe.evaluate.vllm_engine import check_architecture, require_vllm

        require_vllm()
        self.path = Path(path)
        check_architecture(self.path)
        self.tokenizer = load_tokenizer(self.path)
        update: dict[str, Any] = {"max_model_len": config.max_model_len or _context(self.path)}
        if shared and config.gpu_memory_utilization is None:
            update["gpu_memory_utilization"] = SHARED_GPU_SHARE
        self.config = config.model_copy(update=update)
        self.llm: Any = None
        self.eos: list[int] = []

    def start(self) -> Any:
        from mergesafe.evaluate.vllm_engine import load_generation_config, start_engine

        if self.llm is None:
            self.llm = start_engine(self.path, self.config)
            self.eos = eos_token_ids(load_generation_config(self.path), self.tokenizer)
        return self.llm

    def __call__(self, texts: Sequence[str], max_new_tokens: int, progress: Progress | None = None) -> list[str]:
        from mergesafe.evaluate.vllm_engine import generate_ids, sampling_params

        if not texts:
            return []
        llm = self.start()
        ids = encode_texts(self.tokenizer, texts)
        params = sampling_params(len(ids), max_new_tokens=max_new_tokens, repetition_penalty=1.0, eos=self.eos)
        outs = generate_ids(llm, ids, params)
        eos = set(self.eos)
        results = []
        for o in outs:
            new = list(o.outputs[0].token_ids)
            cut = next((i for i, t in enumerate(new) if t in eos), len(new))
            results.append(self.tokenizer.decode(new[:cut], skip_special_tokens=True))
        if progress is not None:
            progress(len(results))
        return results

    def close(self) -> None:
        from mergesafe.evaluate.vllm_engine import close_engine

        if self.llm is not None:
            llm, self.llm = self.llm, None
            close_engine(llm)


def _context(path: Path) -> int:
    """:data:`JUDGE_CONTEXT`, or the model's `max_position_embeddings` when smaller."""
    try:
        n = int(json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        n = 0
    return min(JUDGE_CONTEXT, n) if n > 0 else JUDGE_CONTEXT
