"""mergesafe.evaluate.judges."""
