"""Aligned plain-text tables, the one layout behind ``pairpack info``, ``pairpack stats`` and the
DPO demo's checkpoint table."""

from __future__ import annotations

from typing import Sequence

__all__ = ["text_table"]


def text_table(rows: Sequence[Sequence[str]], align: str = "", *, indent: str = "", rule: bool = False) -> list[str]:
    """``rows`` of cells as lines, columns padded to their widest cell and joined by two spaces.

    Args:
        rows: the cells, the header (if any) first; every row has the same number of cells.
        align: one letter per column, ``"l"`` (pad on the right) or ``"r"``; default: the first
            column left, the others right.
        indent: prefix of every line.
        rule: add a line of dashes, as wide as each column, under the first row.

    Lines carry no trailing blanks.
    """
    ncol = len(rows[0])
    align = align or "l" + "r" * (ncol - 1)
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                  for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(r) for r in rows]
    if rule:
        out.insert(1, line(["-" * w for w in widths]))
    return out
