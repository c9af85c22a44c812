"""``pairpack show``: one pair for a human (colored on a terminal) or for a machine (JSON).

The prompt is dimmed, the chosen completion green and the rejected one red, each under a header
with its token count; without color the same text is printed plain, so piped output and logs carry
no escape codes. Decoding uses the tokenizer recorded in the manifest and decodes whole rows (a
completion's text is what its row adds to the prompt's, see
:func:`pairpack.tokenization.decode_rows`); ids are shown when the tokenizer is not available (see
:func:`tokenizer_status`) or when asked.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import numpy as np

from ..errors import PairIndexError
from ..format import SEGMENTS
from ..errors import MissingDependencyError, import_optional
from ..tokenization import decode_rows

__all__ = ["render_pair", "pair_to_json", "use_color", "tokenizer_status", "STYLES"]

# click.style keyword arguments per segment (applied only when color is on)
STYLES: dict[str, dict[str, Any]] = {"prompt": {"dim": True}, "chosen": {"fg": "green"}, "rejected": {"fg": "red"}}


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


def tokenizer_status(ds: Any) -> str | None:
    """Why ``ds`` cannot decode, or None when it can: the manifest names no tokenizer (ids built
    without one), the ``tokenizers`` package is missing, or the dataset's copy of the tokenizer
    file is missing or differs from the recorded hash."""
    if ds.tokenizer is not None:
        return None
    t = ds.manifest.tokenizer
    if not t:
        return "tokenizer unknown: the ids were built without a tokenizer"
    if t.get("kind") == "huggingface":
        try:
            import_optional("tokenizers", feature=f"the dataset's tokenizer ({t.get('name')})", extra="hf")
        except MissingDependencyError as e:
            return str(e)
        return (f"the dataset's copy of its tokenizer ({t.get('name')}) is missing or damaged "
                "(pairpack verify says which)")
    return f"tokenizer of kind {t.get('kind')!r} is not known to this pairpack version"


def _texts(ds: Any, pair: Any) -> list[str]:
    return decode_rows(ds.tokenizer, pair.prompt, pair.chosen, pair.rejected)


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
    texts = _texts(ds, pair) if decode else [" ".join(map(str, seg.tolist())) for seg in pair]
    for name, seg, body in zip(SEGMENTS, pair, texts):
        lines.append(style(f"── {name} ({seg.size:,} tokens)", bold=True))
        lines.append(style(body, **STYLES[name]))
    return "\n".join(lines)


def pair_to_json(ds: Any, index: int) -> dict[str, Any]:
    """The ``--json`` object: index, per segment ids/length (and text when decodable), columns."""
    i = _resolve(ds, index)
    pair = ds[i]
    out: dict[str, Any] = {"index": i, "pairs": len(ds)}
    texts = _texts(ds, pair) if ds.tokenizer is not None else None
    for k, (name, seg) in enumerate(zip(SEGMENTS, pair)):
        out[name] = {"length": int(seg.size), "ids": seg.tolist()}
        if texts is not None:
            out[name]["text"] = texts[k]
    out["columns"] = _columns(ds, i)
    return out
