"""The package layout as a rule (README, "Development"): each subpackage may import only the layers
below it, every import included (function-level imports too), with no cycles; ``import pairpack``
and reading a pair load neither torch nor the ingest pipeline."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pairpack"

# unit (a subpackage, or a top-level module) -> the pairpack units it may import
ALLOWED: dict[str, set[str]] = {
    "_version": set(),
    "errors": set(),
    "_accel": set(),
    "progress": set(),
    "tables": set(),
    "format": {"errors"},
    "tokenization": {"format", "errors"},
    "read": {"format", "errors", "_accel", "tokenization"},
    "write": {"format", "errors"},
    "ingest": {"format", "errors", "_accel", "_version", "progress", "tokenization", "write"},
    "batch": {"format", "errors", "_accel", "read"},
    "train": {"format", "errors", "_version", "progress", "tables", "read", "write", "batch"},
    "ops": {"format", "errors", "_version", "progress", "tables", "tokenization", "read", "write", "batch"},
    "dpo": {"train"}, "reference": {"train"}, "cuda": {"batch"}, "ray": {"ingest"},  # documented import paths
    "trl": {"train"},
    "cli": {"*"},
    "__init__": {"_version", "errors", "format", "read", "write", "_accel", "ingest", "batch"},
}
# the only imports that point up a layer: each loads torch, which the importing module must not need
UPWARD_FOR_TORCH = {("read", "batch")}
# inside a function, a pairpack import is allowed only to keep torch (or the ingest pipeline) out of a
# torch-free import, or, in the CLI, to keep `pairpack --help` fast
LAZY_ALLOWED = {
    ("read", "batch"), ("__init__", "ingest"), ("__init__", "batch"), ("__init__", "_accel"),
    ("ops", "batch"), ("batch", "batch"), ("cli", "*"), ("_accel", "_native"),
}
# train/dpo.py is the loss alone: torch, pairpack.errors and the other torch-only modules of train/
# (models.py: how each model family is called with a batch layout; losses.py: the loss formulas;
# hf_attention.py: pairpack's attention registered with transformers, which it imports on use)
TORCH_ONLY = {"train/dpo.py", "train/tinylm.py", "train/models.py", "train/losses.py", "train/hf_attention.py"}


def _unit(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported pairpack unit, at module level?, line) for every import in ``path``."""
    rel = path.relative_to(PKG)
    pkg_parts = ["pairpack", *rel.parts[:-1]]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    typing_only = {id(n) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                   for n in ast.walk(n)}  # never executed: annotations only
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mods = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:
                    mods = [".".join(base + [a.name]) for a in node.names]
            else:
                mods = [node.module or ""]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] == "pairpack" and len(parts) > 1:
                out.append((parts[1], id(node) in top, node.lineno))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG)
    unit = _unit(rel)
    allowed = ALLOWED[unit]
    for target, module_level, line in _imports(path):
        where = f"{rel}:{line} imports pairpack.{target}"
        if target == unit or "*" in allowed:
            continue
        ok = target in allowed or (unit, target) in UPWARD_FOR_TORCH or (unit, target) == ("_accel", "_native")
        assert ok, f"{where}, which is not below {unit} (allowed: {sorted(allowed)})"


def test_function_level_imports_are_only_for_torch_or_startup():
    """A pairpack import inside a function must be one the table above names (keeping torch out of a
    torch-free module, or the CLI's start-up fast); any other belongs at module level."""
    for path in _modules():
        rel = path.relative_to(PKG)
        unit = _unit(rel)
        for target, module_level, line in _imports(path):
            if module_level or target == "_native":
                continue
            assert (unit, target) in LAZY_ALLOWED or (unit, "*") in LAZY_ALLOWED, \
                f"{rel}:{line}: function-level import of pairpack.{target}"


def _module_graph() -> dict[str, set[str]]:
    """Module-level imports between pairpack modules (dotted names), for the cycle check."""
    graph: dict[str, set[str]] = {}
    for path in _modules():
        rel = path.relative_to(PKG)
        name = ".".join(["pairpack", *rel.with_suffix("").parts]).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        pkg_parts = ["pairpack", *rel.parts[:-1]]
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                if node.module:
                    deps.add(".".join(base + [node.module]))
                else:
                    deps |= {".".join(base + [a.name]) for a in node.names}
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            if d not in graph:
                continue  # a name imported from a package (pairpack.format -> its __init__)
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [n, d])
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_dpo_depends_on_torch_only():
    for rel in TORCH_ONLY:
        for node in ast.walk(ast.parse((PKG / rel).read_text())):
            if isinstance(node, ast.Import):
                assert not [a for a in node.names if a.name.startswith("pairpack")], f"{rel}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert not (node.module or "").startswith("pairpack"), f"{rel}:{node.lineno}"
                    continue
                target = node.module if node.level == 2 else f"train/{node.module}.py"
                assert target == "errors" or target in TORCH_ONLY, \
                    f"{rel}:{node.lineno} imports {'.' * node.level}{node.module}, not torch-only"


def test_import_pairpack_and_reading_load_neither_torch_nor_ingest():
    code = ("import sys, pairpack, tempfile, numpy as np\n"
            "d = tempfile.mkdtemp() + '/ds'\n"
            "with pairpack.Writer(d, vocab_size=100) as w:\n"
            "    w.add([1, 2], [3], [4])\n"
            "p = pairpack.open(d)[0]\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pairpack.ingest')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_documented_import_paths():
    code = ("import pairpack, pairpack.dpo, pairpack.reference, pairpack.cuda, pairpack.errors, pairpack.cli\n"
            "for n in ('open', 'build', 'verify', 'Loader', 'Dataset', 'Writer', 'Triplets', 'Pair'): getattr(pairpack, n)\n"
            "pairpack.dpo.DPO; pairpack.reference.precompute_reference; pairpack.cuda.DeviceFeeder")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_every_module_imports_alone():
    names = [".".join(["pairpack", *p.relative_to(PKG).with_suffix("").parts]).removesuffix(".__init__")
             for p in _modules()]
    if importlib.util.find_spec("ray") is None:  # the optional extra pairpack[ray] (make test installs it)
        names = [n for n in names if not n.endswith(".ray")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)"
    for n in names:  # one process each: an import that works only after another module's is a bug
        subprocess.run([sys.executable, "-c", code, n], check=True, capture_output=True)
