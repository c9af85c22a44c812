"""The README's promises that can drift: the two set-up commands and the CLI it documents."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from pairpack.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_setup_is_make_demo_and_make_test():
    assert "make demo" in README and "make test" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_documented_command_exists_and_has_help():
    documented = set(re.findall(r"`pairpack ([a-z]+)", README))
    assert {"build", "info", "show", "verify", "stats", "merge", "export", "pack", "unpack", "demo"} <= documented
    runner = CliRunner()
    for cmd in sorted(documented):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Example" in res.output, f"`pairpack {cmd} --help` has no example"


def test_documented_build_flags_exist():
    res = CliRunner().invoke(main, ["build", "--help"])
    for flag in re.findall(r"`(--[a-z-]+)", README):
        if flag in ("--help",):
            continue
        cmds = [[c, "--help"] for c in ("build", "stats", "export", "show", "demo", "pack", "unpack",
                                         "verify", "merge", "info")] + [["--help"]]
        assert any(flag in CliRunner().invoke(main, c).output for c in cmds), flag
    assert res.exit_code == 0
