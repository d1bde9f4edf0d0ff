"""Judge registry: `load_judge("keyword" | "llama-guard:PATH" | "wildguard:PATH" | "harmbench:PATH")`."""

from __future__ import annotations

from pathlib import Path

from mergesafe.errors import UserError
from mergesafe.evaluate.judges.base import Judge
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
                        "wildguard:PATH, harmbench:PATH)")
    if not path:
        raise UserError(f"judge {spec!r} needs a local model folder: {name}:PATH")
    return name, Path(path).expanduser()


def check_judge_spec(spec: str) -> None:
    """Validate a judge spec without loading it (folder exists, is a model folder)."""
    name, path = parse_judge_spec(spec)
    if path is not None:
        if not path.is_dir():
            raise UserError(f"{name} judge folder not found", path=path)
        if not (path / "config.json").is_file():
            raise UserError(f"{name} judge folder has no config.json (not a model folder)", path=path)


def load_judge(spec: str, *, batch_size: int = 8, device: str | None = None) -> Judge:
    """Load a judge once; the returned object can judge any number of models."""
    name, path = parse_judge_spec(spec)
    if path is None:
        return KeywordJudge()
    return MODEL_JUDGES[name](path, batch_size=batch_size, device=device)
