"""mergesafe.world."""
