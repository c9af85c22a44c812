"""The sidecar ``<export>.pairpack.json`` that ``pairpack export`` writes beside a JSONL export: the
dataset settings a later ``pairpack build`` of that export reads back (docs/building.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import FormatError

SIDECAR_SUFFIX = ".pairpack.json"
SIDECAR_FORMAT = "pairpack-export"  # value of the sidecar's "format" key


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The export sidecar of input ``path`` (``<path>.pairpack.json``), or None."""
    p = Path(str(path) + SIDECAR_SUFFIX)
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"unreadable export sidecar ({e})", path=p, field="sidecar") from None
    return obj if isinstance(obj, dict) and obj.get("format") == SIDECAR_FORMAT else None
