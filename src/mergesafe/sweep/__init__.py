"""mergesafe.sweep."""
