"""Record shapes: turning one parsed input record into (prompt, chosen, rejected).

Each segment comes out either as text (``str``) or as token ids (a list of ints); the build
tokenizes text. The shape here is the explicit one: three fields, found by dotted paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from .errors import SourceError

__all__ = ["FieldSpec", "Segment", "get_path", "extract"]

Segment = Union[str, list]


@dataclass(frozen=True)
class FieldSpec:
    """Where the three segments live in a record; dotted paths (``"input.prompt"``) allowed."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


_MISSING = object()


def get_path(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"`` (integers index lists); a sentinel when absent."""
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
        if cur is _MISSING:
            return _MISSING
    return cur


def _segment(value: Any, field: str) -> Segment:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not all(type(v) is int for v in value):
            bad = next(v for v in value if type(v) is not int)
            raise SourceError(f"token ids must be integers, found {bad!r}", field=field, reason="bad_id")
        return value
    raise SourceError(f"must be a string or a list of token ids, got {type(value).__name__}",
                      field=field, reason="wrong_type")


def extract(data: Any, spec: FieldSpec) -> tuple[Segment, Segment, Segment]:
    """The three segments of a record. Raises SourceError (``field`` set, no path/line)."""
    if not isinstance(data, dict):
        raise SourceError(f"record must be a JSON object, got {type(data).__name__}", reason="wrong_type")
    out = []
    for field in (spec.prompt, spec.chosen, spec.rejected):
        v = get_path(data, field)
        if v is _MISSING or v is None:
            raise SourceError("missing field", field=field, reason="missing_field")
        out.append(_segment(v, field))
    return out[0], out[1], out[2]
