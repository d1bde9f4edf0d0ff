"""mergesafe.evaluate.scorers."""
