"""Helpers for tests that run the `mergesafe` command line in-process."""

from __future__ import annotations

from pathlib import Path

from mergesafe.cli.main import main


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """Run `mergesafe ARGS`; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(args: list, capsys, *fragments: str) -> str:
    """Bad input: exit 2 and exactly one `mergesafe: error:` line containing every fragment."""
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mergesafe: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    """Temporary or backup folders an atomic write left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
