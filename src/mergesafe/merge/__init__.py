"""mergesafe.merge."""
