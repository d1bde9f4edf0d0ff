"""mergesafe.merge.methods."""
