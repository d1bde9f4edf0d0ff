"""mergesafe.report."""
