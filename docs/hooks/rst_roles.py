"""MkDocs hook: the docstrings' Sphinx roles (``:class:`~pairpack.Dataset```, ``:func:`x```) shown as
code in the API reference, ``~`` keeping only the last name as Sphinx does. The docstrings stay
readable in ``help()`` and in an editor; this only drops the role markup from the rendered page."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([^<]*)</code>")


def _code(m: re.Match[str]) -> str:
    name = m.group(2)
    if m.group(1):
        name = name.rsplit(".", 1)[-1]
    return f"<code>{name}</code>"


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    return ROLE.sub(_code, html)
