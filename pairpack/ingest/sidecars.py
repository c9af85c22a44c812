"""Rebuilding exports (``pairpack export``): an export's sidecar (``FILE.pairpack.json``) carries the
settings it was built with (vocabulary, special ids, tokenizer, shard size, columns), which a
build of the export takes unless it was given them; several exports must agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import format as fmt
from ..errors import SourceError
from ..format.sidecar import read_sidecar
from ..tokenization import ByteTokenizer, tokenizer_from_manifest
from .job import ColumnSpec
from .sources import Source

__all__ = ["WriteSettings", "apply_sidecars"]


@dataclass
class WriteSettings:
    """The settings an export's sidecar can supply: the tokenizer, ``vocab_size``, ``pad_id``,
    ``shard_bytes``, ``dedup_window`` and the kept ``columns`` (None / empty: not given)."""

    tok: Any
    vocab_size: int | None
    pad_id: int | None
    shard_bytes: int | None
    dedup_window: int | None
    columns: tuple[ColumnSpec, ...]


def apply_sidecars(sources: list[Source], s: WriteSettings) -> WriteSettings:
    """``s`` completed from the inputs' export sidecars: rebuilding exports takes vocabulary,
    special ids, tokenizer, shard size and columns from them. Several exports must agree; an input
    without a sidecar among exports is refused, since its ids could mean anything."""
    files = [x for x in sources if x.size]
    sides = [read_sidecar(x.path) for x in files]
    if not any(sides):
        return s
    first = next(i for i, x in enumerate(sides) if x)
    side = sides[first]
    key = ("vocab_size", "pad_id", "bos_id", "eos_id", "token_dtype", "tokenizer", "columns")

    def tok_key(x: dict[str, Any]) -> dict[str, Any]:
        return {k: (fmt.tokenizer_key(x.get(k)) if k == "tokenizer" else x.get(k)) for k in key}

    for src, x in zip(files, sides):
        if x is None and s.tok is None and s.vocab_size is None:
            raise SourceError(f"this input has no export sidecar ({Path(src.path).name}.pairpack.json) while "
                              f"{Path(files[first].path).name} has one: their ids may come from different "
                              "tokenizers; pass --tokenizer or --vocab-size to build them together",
                              path=src.path, reason="missing_sidecar")
        if x is not None and tok_key(x) != tok_key(side):
            diff = next(k for k in key if tok_key(x)[k] != tok_key(side)[k])
            raise SourceError(f"exported with other settings than {Path(files[first].path).name} "
                              f"({diff}: {x.get(diff)!r} vs {side.get(diff)!r}); build them separately",
                              path=src.path, reason="mixed_exports")
    if s.tok is None:
        s.tok = _sidecar_tokenizer(side, Path(files[first].path).parent)
    if s.vocab_size is None and s.tok is None:
        s.vocab_size = side.get("vocab_size")
    s.pad_id = side.get("pad_id") if s.pad_id is None else s.pad_id
    s.shard_bytes = side.get("shard_bytes") if s.shard_bytes is None else s.shard_bytes
    s.dedup_window = side.get("dedup_window") if s.dedup_window is None else s.dedup_window
    if not s.columns and side.get("columns"):
        s.columns = tuple(ColumnSpec(c["name"], c["name"], c["dtype"]) for c in side["columns"])
    return s


def _sidecar_tokenizer(side: dict[str, Any], where: Path) -> Any:
    t = side.get("tokenizer")
    if not isinstance(t, dict):
        return None
    if t.get("kind") == "bytes":
        return ByteTokenizer()
    if t.get("kind") == "huggingface":
        obj = dict(t)
        if isinstance(side.get("tokenizer_file"), str):
            obj["file"] = {"path": side["tokenizer_file"]}
        got = tokenizer_from_manifest(obj, where)
        if got is None:
            raise SourceError("the export's tokenizer file is missing or differs; pass --tokenizer",
                              path=where, reason="missing_tokenizer")
        return got
    return None
