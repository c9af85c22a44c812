"""Module dependencies point one way (the brief's layering), checked on the source's imports.

errors <- format <- {writer, reader} <- {batching, sampling, cuda, loader} <- cli;
dpo depends on torch only (other pairpack modules only lazily, inside functions).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pairpack"

# module -> pairpack modules it must never import at module level
FORBIDDEN = {
    "errors": {"*"},
    "format": {"writer", "reader", "build", "cli", "loader", "batching", "sampling", "cuda", "dpo", "triplets"},
    "writer": {"reader", "build", "cli", "loader", "batching", "sampling", "cuda", "dpo"},
    "reader": {"writer", "build", "cli", "loader", "batching", "sampling", "cuda", "dpo"},
    "triplets": {"writer", "reader", "build", "cli", "loader", "batching", "sampling", "cuda", "dpo"},
    "dpo": {"*"},
    "sources": {"reader", "writer", "cli", "loader", "batching", "cuda", "dpo"},
    "shapes": {"reader", "writer", "cli", "loader", "batching", "cuda", "dpo"},
    "tokenization": {"reader", "writer", "cli", "loader", "batching", "cuda", "dpo"},
    "batching": {"cli", "build", "loader", "cuda"},
    "sampling": {"cli", "build", "writer", "loader", "cuda"},
    "loader": {"cli", "build"},
    "cuda": {"cli", "build", "loader"},
    "tinylm": {"*"},
    "stats": {"cli", "build", "cuda", "dpo"},
    "archive": {"cli", "build", "loader", "cuda", "dpo"},
    "merge": {"cli", "loader", "cuda", "dpo"},
    "show": {"cli", "build", "loader", "cuda", "dpo"},
    "reference": {"cli", "build"},
    "demo": {"cli"},
}


def test_nothing_imports_cli():
    for path in PKG.glob("*.py"):
        if path.stem != "cli":
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert not ((node.module or "").endswith("cli") or
                                any(a.name == "cli" for a in node.names)), f"{path.name} imports cli"


def _top_level_pairpack_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:  # module level only: imports inside functions are lazy on purpose
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            mod = (node.module or "").split(".")[0]
            out |= {mod} if mod else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pairpack"):
            out.add((node.module.split(".") + [""])[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pairpack.")}
    return out


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_imports_point_one_way(module):
    path = PKG / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{module}.py not present")
    imported = _top_level_pairpack_imports(path) - {""}
    banned = FORBIDDEN[module]
    if "*" in banned:
        allowed = {"errors"} if module != "errors" else set()
        assert imported <= allowed, f"{module} imports {imported}"
    else:
        assert not (imported & banned), f"{module} imports {imported & banned}"


def test_import_pairpack_does_not_import_torch():
    code = "import sys, pairpack; pairpack.open; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_module_imports_alone():
    for path in sorted(PKG.glob("*.py")):
        name = f"pairpack.{path.stem}" if path.stem != "__init__" else "pairpack"
        subprocess.run([sys.executable, "-c", f"import {name}"], check=True, capture_output=True)
