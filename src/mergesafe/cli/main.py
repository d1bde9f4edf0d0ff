"""Entry point: builds the Typer app from one module per command and maps bad input to exit 2."""

from __future__ import annotations

import os
import sys

import typer

from mergesafe.errors import UserError

app = typer.Typer(
    name="mergesafe",
    help=(
        "Keep fine-tuned LLMs safe: fine-tune, merge the pre- and post-tuning weights, "
        "evaluate safety and task quality, sweep merge weights, and pick the model to ship."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register() -> None:
    # One module per command (`cli/<name>_cmd.py`); each exposes `command`, and its module
    # docstring is the command's help text.
    import importlib

    for name, module in (("finetune", "finetune_cmd"), ("merge", "merge_cmd"), ("eval", "eval_cmd"),
                         ("sweep", "sweep_cmd"), ("demo", "demo_cmd"), ("compare", "compare_cmd"),
                         ("harden", "harden_cmd")):
        mod = importlib.import_module(f"mergesafe.cli.{module}")
        first = " ".join(mod.__doc__.split("\n\n")[0].split())
        app.command(name, help=mod.__doc__, short_help=first.split(". ")[0].rstrip(".") + ".")(mod.command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads from a hub, ever
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, prog_name="mergesafe")
    except UserError as err:
        print(f"mergesafe: error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
