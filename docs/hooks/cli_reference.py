"""MkDocs hook: the CLI reference page, written from the click commands at build time.

``docs/reference/cli.md`` holds the marker ``<!-- pairpack-cli -->``; each build replaces it with
``pairpack --help`` and every command's ``--help`` (usage, description, examples, every option with
its default), taken from :data:`pairpack.cli.main` itself, so the page cannot drift from the CLI.
"""

from __future__ import annotations

from typing import Any

import click

MARKER = "<!-- pairpack-cli -->"
WIDTH = 100  # the CLI's own max_content_width


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    return cmd.get_help(ctx)


def cli_reference() -> str:
    """The markdown of the reference: a section per command, in the group's listing order."""
    from pairpack.cli import main

    root = click.Context(main, info_name="pairpack", terminal_width=WIDTH, max_content_width=WIDTH)
    out = ["## `pairpack`", "", "```text", _help(main, "pairpack", None), "```", ""]
    for name in main.list_commands(root):
        cmd = main.get_command(root, name)
        assert cmd is not None
        out += [f"## `pairpack {name}`", "", "```text", _help(cmd, name, root), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
