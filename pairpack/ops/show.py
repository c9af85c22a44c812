"""``pairpack show``: one pair for a human (colored on a terminal) or for a machine (JSON).

The prompt is dimmed, the chosen completion green and the rejected one red, each under a header
with its token count; without color the same text is printed plain, so piped output and logs carry
no escape codes. Decoding uses the tokenizer recorded in the manifest; ids are shown when it is
unknown or when asked.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import numpy as np

from ..errors import PairIndexError
from ..format import SEGMENTS

__all__ = ["render_pair", "pair_to_json"]

# click.style keyword arguments per segment (applied only when color is on)
_STYLES: dict[str, dict[str, Any]] = {"prompt": {"dim": True}, "chosen": {"fg": "green"}, "rejected": {"fg": "red"}}


def use_color(flag: bool | None, stream: TextIO | None = None) -> bool:
    """Resolve ``--color/--no-color``: an explicit flag wins; otherwise color only when ``stream``
    (default stdout) is a terminal and ``NO_COLOR`` is unset (https://no-color.org)."""
    if flag is not None:
        return flag
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def _resolve(ds: Any, index: int) -> int:
    n = len(ds)
    i = index + n if index < 0 else index
    if not 0 <= i < n:
        raise PairIndexError(f"pair index {index} out of range for {n} pairs")
    return i


def _columns(ds: Any, i: int) -> dict[str, Any]:
    return {name: np.asarray(ds.column(name)[i]).item() for name in ds.column_names}


def render_pair(ds: Any, index: int, *, show_ids: bool = False, color: bool = False) -> str:
    """The text ``pairpack show`` prints for pair ``index`` (negative counts from the end).

    Args:
        ds: an open :class:`~pairpack.Dataset`.
        show_ids: print token ids instead of decoded text.
        color: add ANSI styles (prompt dim, chosen green, rejected red, bold headers).

    Raises IndexError for an index outside the dataset.
    """
    import click

    i = _resolve(ds, index)
    pair = ds[i]
    decode = ds.tokenizer is not None and not show_ids
    p, c, r = (int(seg.size) for seg in pair)
    style = click.style if color else (lambda text, **_: text)
    lines = [style(f"pair {i:,} of {len(ds):,}: rows prompt+chosen {p + c:,}, prompt+rejected {p + r:,} tokens",
                   bold=True)]
    cols = _columns(ds, i)
    if cols:
        lines.append("columns: " + ", ".join(f"{k}={v!r}" for k, v in cols.items()))
    for name, seg in zip(SEGMENTS, pair):
        body = ds.decode(seg) if decode else " ".join(map(str, seg.tolist()))
        lines.append(style(f"── {name} ({seg.size:,} tokens)", bold=True))
        lines.append(style(body, **_STYLES[name]))
    return "\n".join(lines)


def pair_to_json(ds: Any, index: int) -> dict[str, Any]:
    """The ``--json`` object: index, per segment ids/length (and text when decodable), columns."""
    i = _resolve(ds, index)
    pair = ds[i]
    out: dict[str, Any] = {"index": i, "pairs": len(ds)}
    for name, seg in zip(SEGMENTS, pair):
        out[name] = {"length": int(seg.size), "ids": seg.tolist()}
        if ds.tokenizer is not None:
            out[name]["text"] = ds.decode(seg)
    out["columns"] = _columns(ds, i)
    return out
