"""What one block's processing is given and gives back: the :class:`_Job` fixed before the first
block (so the output never depends on the number of workers), the :class:`BlockResult` of a block
(:class:`Group` s for multi-completion records), the kept :class:`ColumnSpec` s, and the checked
encoding of one segment or column value that the block paths share."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import format as fmt
from ..errors import PairpackError, SourceError
from ..tokenization import encode_continuations
from .joins import encode_text_pairs
from ..write.writer import check_ids
from .multi import MultiOptions
from .shapes import MISSING, ShapeOptions, get_path, missing_field

__all__ = ["ColumnSpec", "BlockResult", "Group"]

_U32 = 1 << 32
# an invalid record: (line, field, reason, message, record text)
_Error = tuple[int, "str | None", str, str, str]


@dataclass
class _Job:
    """Everything a worker needs; fixed before the first block (so output never depends on N)."""

    opts: ShapeOptions
    tokenizer: Any  # encodes text; None for id inputs without a tokenizer
    mode: str  # "text" or "ids"
    limit: int  # ids must be below it
    bos: int | None  # prepended to prompts when not already first (None: never)
    eos: int | None  # appended to completions when not already last (None: never)
    drop_identical: bool
    columns: tuple[ColumnSpec, ...] = ()  # record fields kept as per-pair columns
    multi: MultiOptions | None = None  # multi-completion records (pairs made by a rule)
    boundary: str = "prompt"  # text pairs whose join merges tokens: see pairpack.ingest.joins


@dataclass(frozen=True)
class ColumnSpec:
    """A record field kept as a per-pair column: column ``name`` (FORMAT.md §4.4) from the field
    at dotted ``path``, stored as ``dtype``."""

    name: str
    path: str
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str, dtype: str | None = None) -> "ColumnSpec":
        """``"score_chosen"``, ``"chosen_score=scores.chosen"`` or ``"rating=meta.rating:int64"``:
        column name (default: the field with non-alphanumerics as ``_``), field, dtype."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = "", text
        dt = dtype or "float32"
        if ":" in path:
            path, dt = path.rsplit(":", 1)
        name = name or re.sub(r"[^a-z0-9_]", "_", path.lower())
        if dt not in fmt.COLUMN_DTYPES or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not path:
            raise ValueError(f"bad column {text!r}: write FIELD, NAME=FIELD or NAME=FIELD:DTYPE with names "
                             f"[a-z][a-z0-9_]* and dtypes {', '.join(sorted(fmt.COLUMN_DTYPES))}")
        if name in ("prompt", "chosen", "rejected"):
            raise ValueError(f"column name {name!r} is a segment name; choose another (NAME=FIELD)")
        return cls(name, path, dt)


@dataclass
class BlockResult:
    """A processed block: pairs as ids plus the block's invalid records, in input order.

    tokens: uint32 ``(T,)``, each pair's prompt, chosen, rejected back to back; lengths: int64
    ``(3, n)``; errors: ``(line, field, reason, message, record text)`` per invalid record;
    columns: name -> ``(n,)`` values of the kept columns; notes: counts of remarks (see
    :class:`pairpack.ingest.shapes.Segments`).
    """

    path: str
    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[tuple[int, str | None, str, str, str]]
    identical: int = 0
    identical_dropped: int = 0
    records: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
    groups: list[Group] | None = None  # multi-completion input: pairs per record, tokens not in ``tokens``
    ties: int = 0
    below_margin: int = 0
    records_without_pairs: int = 0
    max_gap: float = 0.0  # the largest score gap among the block's candidate pairs
    boundary_pairs: int = 0  # kept text pairs whose rows merge tokens across the prompt's end
    boundary_example: dict[str, Any] | None = None  # the block's first such pair (see boundary_example)


@dataclass
class Group:
    """One multi-completion record's pairs: its prompt ids, distinct completion ids (int64), the
    ``(chosen, rejected)`` indices of each pair and the pair's scores."""

    prompt: np.ndarray
    completions: list[np.ndarray]
    pairs: list[tuple[int, int]]
    score_chosen: list[float]
    score_rejected: list[float]


def _seg_ids(seg: Any, name: str, job: _Job, after: int | None = None) -> list[int]:
    """Checked ids of one segment (slow path; the fast path checks a whole block at once).
    ``after``: for a completion, the last id of its prompt (it is encoded as the continuation)."""
    if job.mode == "text":
        if not seg:
            raise SourceError("segment is empty", field=name, reason="empty")
        try:
            ids = (encode_continuations(job.tokenizer, [seg], [after])[0] if after is not None
                   else job.tokenizer.encode(seg))
        except PairpackError as e:
            raise SourceError(str(e), field=name, reason="bad_text") from None
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises plain exceptions
            raise SourceError(f"cannot tokenize ({str(e)[:160]})", field=name, reason="bad_text") from None
        return check_ids(ids, name, job.limit).tolist()
    return check_ids(seg, name, job.limit).tolist()


def _column_value(data: Any, col: ColumnSpec) -> float:
    """The number at ``col.path`` of a record (a SourceError names the field when it is not one)."""
    v = get_path(data, col.path)
    if v is MISSING or v is None:
        raise missing_field(data, col.path, what=f"missing field (kept as column {col.name!r} by --columns)",
                            flag="--columns")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SourceError(f"column {col.name!r} needs a number, got {type(v).__name__} {str(v)[:40]!r}",
                          field=col.path, reason="bad_column")
    if col.dtype.startswith("int") and (not float(v).is_integer()):
        raise SourceError(f"column {col.name!r} is {col.dtype}, got {v!r}", field=col.path, reason="bad_column")
    if not np.isfinite(v):
        raise SourceError(f"column {col.name!r}: non-finite value {v!r}", field=col.path, reason="bad_column")
    return v


def _text_pair_ids(job: _Job, segs: tuple, names: tuple[str, str, str]) -> tuple[list[list[int]], int]:
    """Checked ids of one text pair and its boundary sides (the per-record path; blocks encode
    their pairs in batches with :func:`pairpack.ingest.joins.encode_text_pairs`)."""
    for x, n in zip(segs, names):
        if not x:
            raise SourceError("segment is empty", field=n, reason="empty")
    try:
        (ids, sides), = encode_text_pairs(job.tokenizer, [segs], job.boundary)
    except Exception:  # noqa: BLE001 - the Rust tokenizer raises plain exceptions: name the segment
        for x, n in zip(segs, names):
            _seg_ids(x, n, job)
        raise SourceError("cannot tokenize the whole row", field=names[1], reason="bad_text") from None
    for x, n in zip(ids, names):
        if not x:
            raise SourceError("segment has no token of its own: the whole rows' tokenization merges it into its "
                              "neighbour (--boundary prompt keeps the prompt as tokenized alone)"
                              if n == names[0] else "segment is empty once tokenized", field=n, reason="empty")
    return [check_ids(x, n, job.limit).tolist() for x, n in zip(ids, names)], sides


def boundary_example(job: _Job, segs: tuple, sides: int, where: dict[str, Any]) -> dict[str, Any]:
    """One boundary pair for the report: where it is, the text on each side of the join, and the
    ids there as stored (prompt alone) and as the whole row's tokenization."""
    j = 1 if sides & 1 else 2
    p, c = segs[0], segs[j]
    tok = job.tokenizer
    alone = [int(x) for x in tok.encode(p)]
    whole = [int(x) for x in tok.encode(p + c)]
    n = len(alone)
    return {**where, "row": ("chosen", "rejected")[j - 1], "prompt_end": p[-40:], "completion_start": c[:40],
            "prompt_ids_end": alone[-3:], "whole_row_ids_at_join": whole[max(n - 3, 0):n + 3]}
