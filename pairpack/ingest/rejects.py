"""The rejects file of ``--skip-invalid``: each rejected record with its reason, one JSON object a
line, written beside the output and moved into place only when the build commits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Rejects", "rejects_path"]


def rejects_path(output: str | os.PathLike) -> Path:
    """Where ``--skip-invalid`` writes rejected records: ``<output>.rejects.jsonl`` beside it."""
    p = Path(output)
    return p.parent / (p.name + ".rejects.jsonl")


class Rejects:
    """A rejects file being written (``skip_invalid``): one JSON object a line, first to a temp
    file beside ``final`` (which :func:`pairpack.format.fsio.clean_stale_temps` removes if the
    writer dies), moved into place by :meth:`commit`."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.f: Any = None

    def add(self, entry: dict[str, Any]) -> None:
        if self.f is None:
            self.f = open(self.tmp, "w", encoding="utf-8", errors="backslashreplace")
        self.f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def commit(self) -> str | None:
        """Put the file in place; with no entry, remove a stale one. Returns its path or None."""
        if self.f is None:
            self.final.unlink(missing_ok=True)  # a stale file from an earlier build would mislead
            return None
        self.f.close()
        os.replace(self.tmp, self.final)
        return str(self.final)

    def discard(self) -> None:
        if self.f is not None:
            self.f.close()
        self.tmp.unlink(missing_ok=True)
