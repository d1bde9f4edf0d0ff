"""Entry point: builds the Typer app from one module per command and maps bad input to exit 2.

Besides `UserError`, what the system refuses is reported the same way, as one line and exit 2
without a traceback: an `OSError` (disk full, read-only file system, permission denied, a
path through a file, ...) as `mergesafe: error: <file>: <strerror>`, and a `MemoryError`.
Output folders are written atomically (a temporary folder beside the target, removed on any
exception), so such a failure leaves what was on disk as it was.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings

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
    old_show = warnings.showwarning
    warnings.showwarning = show_warning  # every command: one `mergesafe: warning:` line each
    try:
        app(args=argv, prog_name="mergesafe")
    except UserError as err:
        _fail(str(err))
    except MemoryError as err:
        _fail("out of memory" + (f" ({err})" if str(err) else ""))
    except OSError as err:
        _fail(os_error_message(err, _out_arg(sys.argv[1:] if argv is None else argv)))
    finally:
        warnings.showwarning = old_show


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """Warnings (a suspicious adapter, added vocabulary rows, ...) as one line on stderr."""
    text = " ".join(str(message).split())
    print(f"mergesafe: warning: {text[:MAX_LINE]}", file=sys.stderr)


MAX_LINE = 10_000  # characters of an error message shown (a message is one line, never a dump)


def _fail(message: str) -> None:
    """Print `message` as one `mergesafe: error:` line on stderr and exit 2."""
    if len(message) > MAX_LINE:
        message = message[:MAX_LINE] + f"… ({len(message) - MAX_LINE} more characters)"
    line = " ".join(message.splitlines()).strip()
    print(f"mergesafe: error: {line}", file=sys.stderr)
    sys.exit(UserError.exit_code)


# errors of writing whose OSError names no file (a failed write() on a full disk): they concern --out
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _out_arg(argv: list[str]) -> str | None:
    """The value of ``--out`` on the command line, if any."""
    args = [str(a) for a in argv]
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg[len("--out="):]
    return None


def os_error_message(err: OSError, out: str | None = None) -> str:
    """``<file>: <strerror>`` for an OSError from the system: the file it names, else (disk full,
    read-only file system) the output folder `out` being written."""
    filename = err.filename
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if filename is None and err.errno in _WRITE_ERRNOS:
        filename = out
    if err.strerror:
        message = err.strerror
        if err.errno in (errno.EEXIST, errno.ENOTDIR) and filename is not None \
                and os.path.lexists(filename) and not os.path.isdir(filename):
            message += " and is not a folder"
    else:  # a library's own OSError("...") carries only its message
        message = str(err) or type(err).__name__
    if filename is None or isinstance(filename, int):
        return message
    return f"{filename}: {message}"


if __name__ == "__main__":  # pragma: no cover
    main()
