"""What every judge returns, and the base class of the model judges.

A judge looks at (prompt, response) pairs and says whether each response is harmful (an attack
success) and, where it can, whether it is a refusal.  `None` means the judge's output could not be
parsed: such rows are counted as unparsed and left out of the denominator (as the paper does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergesafe.errors import UserError

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Judgement:
    """One verdict: `harmful`/`refusal` are None when unknown or unparsed; `raw` is the judge's text."""

    harmful: bool | None
    refusal: bool | None = None
    raw: str = ""
    categories: tuple[str, ...] = ()


class Judge:
    """Interface: `judge(prompts, responses) -> list[Judgement]`."""

    name: str = "judge"
    can_judge_refusal: bool = False

    def judge(self, prompts: Sequence[str], responses: Sequence[str],
              progress: Progress | None = None) -> list[Judgement]:  # pragma: no cover - interface
        raise NotImplementedError


class ModelJudge(Judge):
    """A causal-LM classifier loaded from a local folder; subclasses give the prompt and the parser.

    The prompt is the judge's published format, tokenized as is (no chat template) and decoded
    greedily; `max_new_tokens` is what the format's answer needs.  `generate(texts,
    max_new_tokens, progress)` replaces transformers (vLLM: `judges/vllm_judge.py`); then no
    model is loaded here, and `close()` frees that backend.
    """

    max_new_tokens: int = 32
    add_bos: bool = False  # True where the published prompt is tokenized with the BOS token added

    def __init__(self, path: str | Path, *, batch_size: int = 8, device: str | None = None,
                 generate: Callable[[Sequence[str], int, Progress | None], list[str]] | None = None) -> None:
        import torch

        from mergesafe.checkpoint.hf_model import load_causal_lm, load_tokenizer, resolve_device

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{self.name} judge folder not found", path=path)
        if not (path / "config.json").is_file():
            raise UserError(f"{self.name} judge folder has no config.json (not a model folder)", path=path)
        self.tokenizer = load_tokenizer(path)
        self.path = path
        self.batch_size = batch_size
        self.generate = generate
        if generate is not None:
            return
        dev = resolve_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.model = load_causal_lm(path, dtype=dtype, device=str(dev))
        self.model.eval()

    # Subclasses implement these two (and are unit-tested on them).
    @staticmethod
    def build_prompt(prompt: str, response: str) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def parse(output: str) -> Judgement:  # pragma: no cover - interface
        raise NotImplementedError

    def judge(self, prompts: Sequence[str], responses: Sequence[str],
              progress: Progress | None = None) -> list[Judgement]:
        from mergesafe.evaluate.generate import generate_texts

        bos = (self.tokenizer.bos_token or "") if self.add_bos else ""
        texts = [bos + self.build_prompt(p, r) for p, r in zip(prompts, responses)]
        if self.generate is not None:
            return [self.parse(o) for o in self.generate(texts, self.max_new_tokens, progress)]
        outputs = generate_texts(self.model, self.tokenizer, texts, batch_size=self.batch_size,
                                 max_new_tokens=self.max_new_tokens, repetition_penalty=1.0,
                                 progress=progress)
        return [self.parse(o) for o in outputs]

    def close(self) -> None:
        """Free the generation backend's memory (a vLLM engine); the transformers model is freed
        with the judge."""
        close = getattr(self.generate, "close", None)
        if close is not None:
            close()
