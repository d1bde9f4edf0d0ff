"""Task scorers, one module each (`numeric`, `exact`, `contains`, `choice`); see `registry.py`."""

from mergesafe.evaluate.scorers.registry import SCORERS, get_scorer

__all__ = ["SCORERS", "get_scorer"]
