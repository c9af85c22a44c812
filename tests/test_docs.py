"""The documentation site covers what it promises (docs/, mkdocs.yml; `mkdocs build --strict` runs in
.ci/run): every public name in the API reference, with a docstring; every CLI command and option in
the CLI reference (generated from the click commands); the format page is spec/FORMAT.md itself."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# the import paths users are told about, and so the API reference's scope: module -> its public names
# (its __all__; pairpack also has backend())
PUBLIC_MODULES = [
    "pairpack", "pairpack.dpo", "pairpack.reference", "pairpack.cuda", "pairpack.ray", "pairpack.errors",
    "pairpack.ops.merge", "pairpack.ops.export", "pairpack.ops.archive", "pairpack.ops.stats",
    "pairpack.write.columns", "pairpack.batch.options", "pairpack.batch.layouts", "pairpack.batch.attention",
    "pairpack.batch.sampling", "pairpack.train.losses", "pairpack.train.models", "pairpack.train.tinylm",
    "pairpack.train.demo", "pairpack.tokenization", "pairpack.ops.split", "pairpack.ops.overlap",
    "pairpack.batch.mixture", "pairpack.trl", "pairpack.train.hf_attention",
]
EXTRA_NAMES = {"pairpack": ["backend"], "pairpack.ingest.build": ["build", "BuildOptions", "BuildReport"]}
# methods without a docstring of their own, for a documented reason
UNDOCUMENTED_OK = {
    # Ray's Datasink hooks: Ray calls them, its documentation describes them
    "Datasink.get_name", "Datasink.min_rows_per_write", "Datasink.on_write_complete", "Datasink.on_write_failed",
    "Datasink.on_write_start",
    # pairpack/ingest/ is being split by role on another branch (issue 28): filled there
    "BuildOptions.column_specs", "BuildReport.to_json", "pairpack.ray.ROWS_PER_TASK",
}


def _public() -> list[tuple[str, str, object]]:
    out = []
    for m in PUBLIC_MODULES + ["pairpack.ingest.build"]:
        if m == "pairpack.ray" and importlib.util.find_spec("ray") is None:
            continue  # the optional extra pairpack[ray] (make test installs it)
        mod = importlib.import_module(m)
        names = EXTRA_NAMES.get(m, []) + ([] if m == "pairpack.ingest.build" else list(mod.__all__))
        out += [(m, n, getattr(mod, n)) for n in names]
    return out


def _constant_docstring(module: str, name: str) -> bool:
    """Whether the module-level assignment of ``name`` that ``module`` defines or imports has an
    attribute docstring (a string right after it: what the API reference shows)."""
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin
    tree = ast.parse(Path(spec.origin).read_text())
    package = module if spec.origin.endswith("__init__.py") else module.rpartition(".")[0]
    for i, node in enumerate(tree.body):
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign)
                   else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            nxt = tree.body[i + 1] if i + 1 < len(tree.body) else None
            return (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str))
        if isinstance(node, ast.ImportFrom) and any(a.name in (name, "*") for a in node.names):
            src = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            if src.startswith("pairpack") and _constant_docstring(src, name):
                return True
    return False


def _directives() -> list[tuple[str, list[str]]]:
    """Every ``::: target`` of the reference pages, with the name filters of its options."""
    out = []
    for page in sorted((DOCS / "reference").glob("*.md")):
        text = page.read_text()
        for m in re.finditer(r"^::: (\S+)\n((?:    .*\n)*)", text, re.M):
            filters = re.findall(r'"!\^(\w+)\$"', m.group(2))
            out.append((m.group(1), filters))
    return out


def test_every_public_name_is_in_the_api_reference():
    directives = _directives()
    missing = []
    for m, n, obj in _public():
        homes = {m}
        if getattr(obj, "__module__", None) and (inspect.isclass(obj) or inspect.isfunction(obj)):
            homes.add(obj.__module__)
        covered = any(t in {f"{h}.{n}" for h in homes} or t in {f"{h}.{getattr(obj, '__name__', n)}" for h in homes}
                      or (t in homes and n not in filters) for t, filters in directives)
        if not covered:
            missing.append(f"{m}.{n}")
    assert not missing, f"not in any docs/reference page: {missing}"


def test_every_public_name_has_a_docstring():
    """The reference is generated from the docstrings, so each public class and function, and each
    public method and property of a public class, says what it is."""
    missing = set()
    for m, n, obj in _public():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            if f"{m}.{n}" not in UNDOCUMENTED_OK and not _constant_docstring(m, n):
                missing.add(f"{m}.{n}")
            continue
        if not (obj.__doc__ or "").strip():
            missing.add(f"{m}.{n}")
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for k, v in vars(obj).items():
                if k.startswith("_") or f"{obj.__name__}.{k}" in UNDOCUMENTED_OK:
                    continue
                if isinstance(v, property) or inspect.isfunction(v):
                    if not (v.__doc__ or "").strip():
                        missing.add(f"{m}.{n}.{k}")
    assert not missing, sorted(missing)


def _cli_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_has_every_command_and_option():
    from pairpack.cli import main

    hook = _cli_hook()
    assert hook.MARKER in (DOCS / "reference" / "cli.md").read_text()
    text = hook.cli_reference()
    for name, cmd in main.commands.items():
        assert f"## `pairpack {name}`" in text, name
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert any(o in text for o in p.opts), (name, p.opts)


def test_format_page_is_the_spec_itself():
    """docs/format.md includes spec/FORMAT.md when the site is built (pymdownx.snippets), not a copy."""
    page = (DOCS / "format.md").read_text()
    assert '--8<-- "spec/FORMAT.md"' in page
    assert "## 8. Reader checks" not in page  # nothing of the spec pasted in


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_page_is_in_the_nav(page):
    assert f": {page}" in (ROOT / "mkdocs.yml").read_text(), f"docs/{page} is not in mkdocs.yml's nav"
