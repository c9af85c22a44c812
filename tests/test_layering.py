"""The house rules as tests (docs/development.md, "House rules"): each subpackage may import only the
layers below it, every import included (function-level imports too); no two modules import each
other, directly or round a cycle (the dataset's lazy entry into batching, ``ds.batch``, is the one
exception); ``import pairpack`` and opening and reading a dataset load neither torch, the ingest
pipeline, the tokenizer module nor the batching package; at most 30 top-level names; no function
over 100 lines; every bad call a ``PairpackError``."""

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
# inside a function, a pairpack import is allowed only to keep torch (or the ingest pipeline, or the
# tokenizer module: reading loads it only to decode) out of a torch-free import, or, in the CLI, to
# keep `pairpack --help` fast
LAZY_ALLOWED = {
    ("read", "batch"), ("read", "tokenization"), ("__init__", "ingest"), ("__init__", "batch"), ("__init__", "_accel"),
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


def _name(rel: Path) -> str:
    return ".".join(["pairpack", *rel.with_suffix("").parts]).removesuffix(".__init__")


# The one import that closes a cycle, on purpose (docs/development.md): ``Dataset.batch`` enters the
# batching package on first use, and batching reads datasets.
CYCLE_EXCEPTIONS = {("pairpack.read.dataset", "pairpack.batch")}


def _module_graph() -> dict[str, dict[str, int]]:
    """Every import between pairpack modules (dotted names), function-level ones included and
    ``if TYPE_CHECKING:`` blocks (never executed) left out: module -> {imported module: line}.
    ``from package import name`` counts as importing the submodule when ``name`` is one."""
    names = {_name(p.relative_to(PKG)) for p in _modules()}
    graph: dict[str, dict[str, int]] = {}
    for path in _modules():
        rel = path.relative_to(PKG)
        name = _name(rel)
        pkg_parts = ["pairpack", *rel.parts[:-1]]
        tree = ast.parse(path.read_text())
        typing_only = {id(m) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for m in ast.walk(n)}
        deps: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = (".".join(pkg_parts[: len(pkg_parts) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:  # a package's own parents are imported with it anyway
                if t in names and t != name and not name.startswith(t + "."):
                    deps.setdefault(t, node.lineno)
        graph[name] = {d: line for d, line in deps.items()
                       if not any(name == a and (d == b or d.startswith(b + ".")) for a, b in CYCLE_EXCEPTIONS)}
    return graph


def test_no_import_cycles():
    """No two modules import each other, directly or round a longer cycle, counting every import
    that runs (function-level ones too): a lazy import is for keeping torch out of a light import,
    never for dodging a cycle. The one exception is :data:`CYCLE_EXCEPTIONS`."""
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d, line in graph[n].items():
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [n, f"{d} (line {line})"])
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_the_cycle_exception_is_still_needed():
    """The documented exception names an import that exists (a stale exception would hide a new cycle)."""
    for a, b in CYCLE_EXCEPTIONS:
        path = PKG.joinpath(*a.split(".")[1:]).with_suffix(".py")
        assert any(t == b.split(".")[1] and not top for t, top, _ in _imports(path)), (a, b)


def test_at_most_30_top_level_names():
    import pairpack

    assert len(pairpack.__all__) <= 30, f"pairpack.__all__ has {len(pairpack.__all__)} names: {pairpack.__all__}"
    assert len(set(pairpack.__all__)) == len(pairpack.__all__)
    for n in pairpack.__all__:
        getattr(pairpack, n)


MAX_FUNCTION_LINES = 100


def test_no_function_over_100_lines():
    """Every function and method, its docstring and signature included, fits in 100 lines."""
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


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


def test_import_pairpack_and_reading_load_neither_torch_nor_ingest(tmp_path):
    """Opening and reading (pairs, lengths, columns, gathers, verify) need numpy alone: torch, the
    ingest pipeline, the tokenizer module and the batching package load only on use, from above
    (``ds.decode``, ``ds.batch``)."""
    import pairpack

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hi", "chosen": " yes", "rejected": " no", "score": 0.5}\n')
    pairpack.build([src], tmp_path / "ds", columns=["score"])  # text: the byte tokenizer, recorded
    code = ("import sys, pairpack\n"
            "def loaded(): return sorted(m for m in sys.modules if m == 'torch' or m.startswith(("
            "'pairpack.ingest', 'pairpack.tokenization', 'pairpack.batch')))\n"
            "ds = pairpack.open(sys.argv[1])\n"
            "p = ds[0]; ds[-1]; list(ds); ds.lengths; ds.column('score'); ds.take([0, 0]); ds.fingerprint\n"
            "assert ds.verify() == [] and pairpack.verify(sys.argv[1]) == []\n"
            "print(loaded())\n"
            "assert ds.decode(p.chosen).startswith(' yes')\n"
            "print(loaded())\n"
            "ds.batch([0])\n"
            "print('pairpack.batch.plan' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.splitlines() == ["[]", "['pairpack.tokenization']", "True"]


def test_documented_import_paths():
    code = ("import pairpack, pairpack.dpo, pairpack.reference, pairpack.cuda, pairpack.errors, pairpack.cli\n"
            "for n in ('open', 'build', 'verify', 'Loader', 'Dataset', 'Writer', 'Triplets', 'Pair'): getattr(pairpack, n)\n"
            "pairpack.dpo.DPO; pairpack.reference.precompute_reference; pairpack.cuda.DeviceFeeder")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _module_names() -> list[str]:
    names = [".".join(["pairpack", *p.relative_to(PKG).with_suffix("").parts]).removesuffix(".__init__")
             for p in _modules()]
    if importlib.util.find_spec("ray") is None:  # the optional extra pairpack[ray] (make test installs it)
        names = [n for n in names if not n.endswith(".ray")]
    return names


@pytest.mark.parametrize("name", _module_names())
def test_every_module_imports_alone(name):
    """One process per module (a test each, so pytest-xdist spreads them): an import that works only
    after another module's is a bug."""
    subprocess.run([sys.executable, "-c", "import importlib, sys; importlib.import_module(sys.argv[1])", name],
                   check=True, capture_output=True)
