"""`mergesafe` command line: finetune | merge | eval | sweep | demo."""

from mergesafe.cli.main import app, main

__all__ = ["app", "main"]
