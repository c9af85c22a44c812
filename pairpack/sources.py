"""Input containers: where raw preference records come from.

A source yields :class:`RawRecord` objects (the parsed JSON value, where it came from, and the
raw text for the rejects file) from JSONL (plain, ``.gz``, ``.zst``) and JSON-array files. Every
file is hashed and counted while it is read, so provenance and progress cost no second pass.
Turning a record into prompt/chosen/rejected is :mod:`pairpack.shapes`' job.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import xxhash

from .errors import SourceError

try:  # orjson parses 3-5x faster; the standard library is the fallback
    import orjson as _json

    _loads = _json.loads
    _JSONError: tuple[type[Exception], ...] = (_json.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised where orjson is absent
    import json as _stdjson

    _loads = _stdjson.loads
    _JSONError = (ValueError,)

__all__ = ["RawRecord", "InputFile", "iter_records", "expand_inputs", "loads"]

loads = _loads
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".jsonl.zstd")
JSON_SUFFIXES = (".json",)


@dataclass
class RawRecord:
    """One input record.

    Attributes:
        path: input file. line: 1-based line (JSONL) or element number (JSON array).
        data: the parsed value (None when ``error`` is set).
        raw: the record's source text (for the rejects file).
        error: a SourceError when the record could not even be parsed.
    """

    path: str
    line: int
    data: Any
    raw: bytes
    error: SourceError | None = None


class _HashingReader(io.RawIOBase):
    """Wraps a binary file: hashes and counts every byte read (xxh3-128)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hash = xxhash.xxh3_128()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        if n:
            self.hash.update(memoryview(b)[:n])
            self.count += n
        return n or 0

    def close(self) -> None:
        self.f.close()
        super().close()


@dataclass
class InputFile:
    """An input file being read: its size, and the hash/count of bytes read so far."""

    path: Path

    def __post_init__(self) -> None:
        self.size = self.path.stat().st_size
        self._reader: _HashingReader | None = None

    @property
    def bytes_read(self) -> int:
        return self._reader.count if self._reader else 0

    @property
    def digest(self) -> str:
        return self._reader.hash.hexdigest() if self._reader else xxhash.xxh3_128().hexdigest()

    def open(self) -> BinaryIO:
        """The decompressed byte stream (gzip and zstandard by suffix, streamed)."""
        self._reader = _HashingReader(open(self.path, "rb", buffering=0))
        buffered = io.BufferedReader(self._reader, 1 << 20)
        name = self.path.name.lower()
        if name.endswith(".gz"):
            return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
        if name.endswith((".zst", ".zstd")):
            try:
                import zstandard
            except ImportError:
                raise SourceError("reading .zst needs zstandard: pip install zstandard",
                                  path=self.path, reason="missing_extra") from None
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(buffered), 1 << 20)  # type: ignore[arg-type]
        return buffered

    def provenance(self) -> dict[str, Any]:
        """The manifest provenance entry of this input (after it was read to the end)."""
        return {"path": self.path.name, "bytes": self.size, "xxh3_128": self.digest}


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths in order; a directory contributes its supported files, sorted by name."""
    out: list[Path] = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and q.name.lower().endswith(
                JSONL_SUFFIXES + JSON_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise SourceError("input file not found", path=p, reason="missing_file")
    if not out:
        raise SourceError("no input files", path=", ".join(map(str, inputs)), reason="missing_file")
    return out


def iter_records(f: InputFile) -> Iterator[RawRecord]:
    """Records of one input file, in order. Malformed ones carry ``error`` instead of data."""
    name = f.path.name.lower()
    path = str(f.path)
    stream = f.open()
    try:
        if name.endswith(JSON_SUFFIXES):
            yield from _json_array(stream, path)
            return
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                data = _loads(line)
            except _JSONError as e:
                yield RawRecord(path, lineno, None, line.rstrip(b"\r\n"),
                                SourceError(f"malformed JSON ({_short(e)})", path=path, line=lineno,
                                            reason="malformed_json"))
                continue
            yield RawRecord(path, lineno, data, line.rstrip(b"\r\n"))
    except (OSError, EOFError) as e:  # truncated gzip/zstd streams, bad magic
        raise SourceError(f"cannot read ({e})", path=path, reason="unreadable") from None
    finally:
        stream.close()


def _json_array(stream: BinaryIO, path: str) -> Iterator[RawRecord]:
    data = stream.read()
    try:
        arr = _loads(data)
    except _JSONError as e:
        raise SourceError(f"malformed JSON ({_short(e)})", path=path, reason="malformed_json") from None
    if not isinstance(arr, list):
        raise SourceError("a .json input must hold an array of records", path=path, reason="malformed_json")
    for i, rec in enumerate(arr, 1):
        raw = _stdjson_dumps(rec)
        yield RawRecord(path, i, rec, raw)


def _stdjson_dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, ensure_ascii=False).encode()


def _short(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:160]
