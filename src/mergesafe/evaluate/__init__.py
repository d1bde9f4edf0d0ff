"""mergesafe.evaluate."""
