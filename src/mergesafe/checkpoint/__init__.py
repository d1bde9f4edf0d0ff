"""mergesafe.checkpoint."""
