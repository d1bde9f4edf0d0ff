"""Judge registry: `load_judge("keyword" | "llama-guard:PATH" | "wildguard:PATH" | "harmbench:PATH")`,
or `FORMAT@URL` (FORMAT: wildguard, llama-guard, harmbench, gpt): a judge behind an OpenAI-compatible
chat endpoint (`endpoint.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergesafe.errors import UserError
from mergesafe.evaluate.judges.base import Judge
from mergesafe.evaluate.judges.endpoint import FORMATS, EndpointJudge, probe_endpoint, split_endpoint_spec
from mergesafe.evaluate.judges.harmbench import HarmBenchJudge
from mergesafe.evaluate.judges.keyword import KeywordJudge
from mergesafe.evaluate.judges.llama_guard import LlamaGuardJudge
from mergesafe.evaluate.judges.wildguard import WildGuardJudge

MODEL_JUDGES: dict[str, type] = {
    "llama-guard": LlamaGuardJudge,
    "wildguard": WildGuardJudge,
    "harmbench": HarmBenchJudge,
}
JUDGE_NAMES = ("keyword", *MODEL_JUDGES)


def parse_judge_spec(spec: str) -> tuple[str, Path | None]:
    """Split `NAME[:PATH]`; check the name and that model judges have a path."""
    name, _, path = spec.partition(":")
    name = name.strip().lower()
    if name == "keyword":
        if path:
            raise UserError(f"judge {spec!r}: the keyword judge takes no path")
        return name, None
    if name not in MODEL_JUDGES:
        raise UserError(f"unknown judge {spec!r} (choose from keyword, llama-guard:PATH, "
                        "wildguard:PATH, harmbench:PATH, or FORMAT@URL with FORMAT one of "
                        f"{', '.join(FORMATS)})")
    if not path:
        raise UserError(f"judge {spec!r} needs a local model folder: {name}:PATH")
    return name, Path(path).expanduser()


def judge_folder(spec: str) -> Path | None:
    """The local folder of a model judge (`NAME:PATH`), else None."""
    if split_endpoint_spec(spec) is not None:
        return None
    return parse_judge_spec(spec)[1]


def _check_judge_model(spec: str, model: str | None) -> None:
    if model is not None and split_endpoint_spec(spec) is None:
        raise UserError(f"--judge-model is for a FORMAT@URL judge, not {spec!r}", path="--judge-model")


def check_judge_spec(spec: str, model: str | None = None) -> None:
    """Validate a judge spec without loading it (folder exists, is a model folder); a `FORMAT@URL`
    judge is asked for its model list (bounded retries), so an unreachable URL fails early."""
    _check_judge_model(spec, model)
    if split_endpoint_spec(spec) is not None:
        probe_endpoint(spec, model)
        return
    name, path = parse_judge_spec(spec)
    if path is not None:
        if not path.is_dir():
            raise UserError(f"{name} judge folder not found", path=path)
        if not (path / "config.json").is_file():
            raise UserError(f"{name} judge folder has no config.json (not a model folder)", path=path)


def load_judge(spec: str, *, batch_size: int = 8, device: str | None = None,
               model: str | None = None, vllm: Any = None, shared: bool = False) -> Judge:
    """Load a judge once; the returned object can judge any number of models.

    `model` (`--judge-model`) picks the served model of a `FORMAT@URL` judge (default: the first
    one the endpoint lists).  `vllm` (an `EvalConfig` of `--backend vllm`): a model judge
    generates on a vLLM engine with its settings (`judges/vllm_judge.py`; `shared`: beside the
    generator's engine)."""
    _check_judge_model(spec, model)
    endpoint = split_endpoint_spec(spec)
    if endpoint is not None:
        return EndpointJudge(*endpoint, model=model)
    name, path = parse_judge_spec(spec)
    if path is None:
        return KeywordJudge()
    if vllm is not None:
        from mergesafe.evaluate.judges.vllm_judge import VllmJudgeBackend

        if not path.is_dir():
            raise UserError(f"{name} judge folder not found", path=path)
        return MODEL_JUDGES[name](path, batch_size=batch_size, device=device,
                                  generate=VllmJudgeBackend(path, vllm, shared=shared))
    return MODEL_JUDGES[name](path, batch_size=batch_size, device=device)
