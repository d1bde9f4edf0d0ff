"""Judges of responses to harmful prompts, one module each; `load_judge(spec)` in `registry.py`."""

from mergesafe.evaluate.judges.base import Judge, Judgement
from mergesafe.evaluate.judges.registry import load_judge

__all__ = ["Judge", "Judgement", "load_judge"]
