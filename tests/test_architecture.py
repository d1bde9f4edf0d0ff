"""The package layering of docs/architecture.md, checked on the source: data flows one way.

Every ``import mergesafe.X`` (module level or inside a function) must go to a package at or
below the importer's own layer, and no package imports another package's private (``_name``)
names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mergesafe"

# Lowest first.  A module may import from its own layer and the layers before it.
LAYERS = ["errors", "_callable", "checkpoint", "stream", "merge", "restore", "finetune",
          "evaluate", "sweep", "report", "api", "world", "cli", "__main__"]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mergesafe"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergesafe"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("mergesafe")]
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, path))
    return out


def test_every_package_has_a_layer():
    packages = {_layer(name) for name, _ in _modules()} - {"mergesafe"}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


@pytest.mark.parametrize("name,path", _modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_go_down_only(name, path):
    mine = _layer(name)
    if mine == "mergesafe":
        return  # the package's lazy __getattr__ may name any stage
    for module, names in _imports(path):
        other = _layer(module)
        if other == mine:
            continue
        if other == "mergesafe":  # `from mergesafe import __version__`
            assert all(n.startswith("__") for n in names), (name, module, names)
            continue
        assert LAYERS.index(other) < LAYERS.index(mine), f"{name} imports {module} (upwards)"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{name} imports private names {private} from {module}"


def test_the_check_can_fail(tmp_path):
    """The parser sees function-level imports (the ones an import circle hides in)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mergesafe.restore.apply import restore_merge\n")
    assert _imports(f) == [("mergesafe.restore.apply", ["restore_merge"])]
