"""The promises of the README and the documentation pages that can drift: the two set-up commands,
and every `pairpack COMMAND` and `--flag` they mention."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from pairpack.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# the README and every page of the documentation site (docs/, mkdocs.yml)
DOCUMENTED = "\n".join([README] + [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md"))])


def test_setup_is_make_demo_and_make_test():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_documented_command_exists_and_has_help():
    documented = set(re.findall(r"`pairpack ([a-z]+)", DOCUMENTED))
    assert {"build", "info", "show", "verify", "stats", "merge", "export", "pack", "unpack", "demo"} <= documented
    runner = CliRunner()
    for cmd in sorted(documented):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Example" in res.output, f"`pairpack {cmd} --help` has no example"


def test_documented_build_flags_exist():
    runner = CliRunner()
    helps = [runner.invoke(main, [c, "--help"]) for c in main.commands] + [runner.invoke(main, ["--help"])]
    assert all(h.exit_code == 0 for h in helps)
    for flag in sorted(set(re.findall(r"`(--[a-z-]+)", DOCUMENTED)) - {"--help"}):
        assert any(flag in h.output for h in helps), flag
