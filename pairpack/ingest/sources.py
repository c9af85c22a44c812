"""Input containers: where raw preference records come from.

A :class:`Source` is one input: a JSONL file (plain, ``.gz``, ``.zst``), a JSON-array file
(streamed above :data:`JSON_SLURP_BYTES`, so memory is bounded by one element), a Parquet file
(read in record batches with pyarrow, an optional extra), a Hugging Face ``datasets.Dataset``
object, or an in-memory list of records (Python API). A directory contributes its supported files,
recursively, sorted by relative path.

Sources hand out :class:`Block` objects: JSONL blocks are raw bytes of whole lines (parsed by
whoever processes the block, i.e. by build workers, so the main process never parses JSONL);
other containers give parsed records. Every source counts its *units* (physical lines of a
JSONL file, elements of a JSON array, rows of a table) and can hand out the blocks of a unit range,
which is how ``--num-shards/--shard-index`` split an input deterministically.
Turning a record into prompt/chosen/rejected is :mod:`pairpack.ingest.shapes`' job.
"""

from __future__ import annotations

import abc
import codecs
import gzip
import io
import json
import os
import queue
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import xxhash

from ..errors import SourceError, import_optional

try:  # orjson parses 3-5x faster; the standard library is the fallback
    import orjson as _json

    _loads = _json.loads
    _JSONError: tuple[type[Exception], ...] = (_json.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised where orjson is absent
    _loads = json.loads
    _JSONError = (ValueError,)

__all__ = ["Source", "JsonlSource", "JsonArraySource", "ParquetSource", "RecordsSource", "open_sources"]

loads = _loads
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".jsonl.zstd", ".ndjson.gz", ".ndjson.zst")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
JSON_SLURP_BYTES = 64 << 20  # JSON arrays up to this size are parsed at once (orjson); larger stream
BLOCK_BYTES = 1 << 20  # JSONL bytes per block
BLOCK_RECORDS = 512  # parsed records per block
# A JSONL line longer than this is rejected ("too_long") without being held in memory: a file
# with no newlines (a binary passed by mistake, a broken export) must not be read whole. The
# build's --max-record-bytes changes it per build.
MAX_RECORD_BYTES = 64 << 20


@dataclass
class RawRecord:
    """One input record.

    Attributes:
        path: input file. line: 1-based line (JSONL) or element/row number (other containers).
        data: the parsed value (None when ``error`` is set).
        raw: the record's source text (for the rejects file); None when it is a parsed value.
        error: a SourceError when the record could not even be parsed.
    """

    path: str
    line: int
    data: Any
    raw: bytes | None
    error: SourceError | None = None


@dataclass
class Block:
    """A run of consecutive records of one source.

    Either ``data`` (JSONL: whole lines, the first being line ``first_line``, 1-based) or
    ``records`` (``(number, value)`` pairs). ``done_bytes``: the source's bytes consumed once this
    block is processed (for progress).
    """

    path: str
    first_line: int
    data: bytes | None = None
    records: list[tuple[int, Any]] | None = None
    done_bytes: int = 0
    max_record_bytes: int = MAX_RECORD_BYTES  # longer JSONL lines are rejected as "too_long"


def block_records(block: Block) -> Iterator[RawRecord]:
    """The records of a block, parsing JSONL lines (malformed ones carry ``error``)."""
    path = block.path
    if block.records is not None:
        for n, v in block.records:
            yield RawRecord(path, n, v, None)
        return
    data = block.data or b""
    lineno = block.first_line - 1
    for line in data.split(b"\n"):
        lineno += 1
        if len(line) > block.max_record_bytes:
            yield RawRecord(path, lineno, None, line[:1024],
                            SourceError(f"record longer than {block.max_record_bytes:,} bytes "
                                        "(--max-record-bytes)", path=path, line=lineno, reason="too_long"))
            continue
        if not line.strip():
            continue
        try:
            v = _loads(line)
        except _JSONError as e:
            yield RawRecord(path, lineno, None, line.rstrip(b"\r"), _parse_error(e, line, path, lineno))
            continue
        if type(v) is list and v and isinstance(v[0], dict):  # a JSON array of records saved as .jsonl
            yield RawRecord(path, lineno, None, line.rstrip(b"\r")[:1024], SourceError(
                f"the line holds a JSON array ({len(v):,} records), not one record; {_ARRAY_HINT}",
                path=path, line=lineno, reason="wrong_type"))
            continue
        yield RawRecord(path, lineno, v, line.rstrip(b"\r"))


_ARRAY_HINT = "the file looks like a JSON array: name it .json (JSON Lines, .jsonl, hold one record per line)"
_JSONL_HINT = "the file looks like JSON Lines (one record per line): name it .jsonl"


def _parse_error(e: Exception, line: bytes, path: str, lineno: int) -> SourceError:
    """The SourceError of a line that does not parse: bad UTF-8 gets its own reason; the opening
    line of a pretty-printed JSON array gets a hint to rename the file."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as u:
        return SourceError(f"invalid UTF-8 at byte {u.start} of the line", path=path, line=lineno,
                           reason="bad_utf8")
    hint = f"; {_ARRAY_HINT}" if lineno == 1 and line.strip().startswith(b"[") else ""
    return SourceError(f"malformed JSON ({_short(e)}){hint}", path=path, line=lineno, reason="malformed_json")


def _looks_like_jsonl(head: bytes) -> bool:
    """Whether a file's first bytes are JSON Lines: a first line that is a whole JSON object,
    followed by another line."""
    first, nl, rest = head.partition(b"\n")
    if not nl or not rest.strip():
        return False
    try:
        return isinstance(_loads(first), dict)
    except _JSONError:
        return False


def record_text(rec: RawRecord) -> str:
    """The record's text for a rejects file: its source line, or its value as JSON."""
    if rec.raw is not None:
        return rec.raw.decode("utf-8", errors="replace")
    try:
        return _json.dumps(rec.data, default=str, option=_json.OPT_SERIALIZE_NUMPY).decode()
    except Exception:  # noqa: BLE001 - best effort for exotic values
        return json.dumps(rec.data, default=str, ensure_ascii=False)


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


class Source(abc.ABC):
    """An input. Subclasses implement :meth:`units`, :meth:`blocks` and :meth:`provenance`."""

    path: str = "<records>"
    size: int = 0  # bytes, for progress (0 when unknown)

    @abc.abstractmethod
    def units(self) -> int:
        """Number of units (lines, elements or rows): the coordinate of ``--num-shards`` splits."""

    @abc.abstractmethod
    def blocks(self, lo: int = 0, hi: int | None = None) -> Iterator[Block]:
        """Blocks holding the records of units ``[lo, hi)`` (0-based), in order."""

    def first_records(self, k: int) -> list[Any]:
        """Up to ``k`` parsed records from the start (for shape detection); malformed ones skipped."""
        out: list[Any] = []
        with closing(self.blocks()) as blocks:  # stops a read-ahead thread now, not at garbage collection
            for b in blocks:
                for r in block_records(b):
                    if r.error is None:
                        out.append(r.data)
                    if len(out) >= k:
                        return out
        return out

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """The manifest provenance entry of this input."""


class _FileSource(Source):
    def __init__(self, path: Path) -> None:
        self.file = path
        self.path = str(path)
        try:
            self.size = path.stat().st_size
        except OSError as e:
            raise SourceError(f"cannot read input ({e.strerror or e})", path=path, reason="unreadable") from None
        self._digest: str | None = None
        self._reader: _HashingReader | None = None

    def _open(self) -> BinaryIO:
        """The decompressed byte stream (gzip and zstandard by suffix, streamed)."""
        try:
            self._reader = _HashingReader(open(self.file, "rb", buffering=0))
        except OSError as e:
            raise SourceError(f"cannot open input ({e.strerror or e})", path=self.file, reason="unreadable") from None
        buffered = io.BufferedReader(self._reader, 1 << 20)
        name = self.file.name.lower()
        if name.endswith(".gz"):
            return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
        if name.endswith((".zst", ".zstd")):
            zstandard = import_optional("zstandard", feature=f"reading {self.file}", extra=None)
            return io.BufferedReader(_ZstdFrames(buffered, zstandard), 1 << 20)  # type: ignore[return-value]
        return buffered

    def _finished(self) -> None:
        # a full read hashed every byte on the way: no second pass for provenance
        if self._reader is not None and self._reader.count == self.size:
            self._digest = self._reader.hash.hexdigest()

    @property
    def bytes_read(self) -> int:
        return self._reader.count if self._reader else 0

    def provenance(self) -> dict[str, Any]:
        if self._digest is None:
            h = xxhash.xxh3_128()
            with open(self.file, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return {"path": self.file.name, "bytes": self.size, "xxh3_128": self._digest}


class JsonlSource(_FileSource):
    """JSON Lines, plain or compressed. Units are physical lines (blank ones included).

    A line longer than ``max_record_bytes`` is passed on cut to ``max_record_bytes + 1`` bytes
    (so it is rejected as "too_long") and the rest of it is skipped unread into memory.
    """

    max_record_bytes = MAX_RECORD_BYTES

    def units(self) -> int:
        n = 0
        last = b"\n"
        stream = self._open()
        try:
            while chunk := stream.read(4 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        except (OSError, EOFError) as e:
            raise SourceError(f"cannot read ({e})", path=self.path, reason="unreadable") from None
        finally:
            stream.close()
        self._finished()
        return n + (last != b"\n")

    def blocks(self, lo: int = 0, hi: int | None = None) -> Iterator[Block]:
        stream = _ReadAhead(self._open(), BLOCK_BYTES)
        line = 0  # 0-based index of the first line in `chunk`
        rest = b""
        try:
            while True:
                data = stream.read(BLOCK_BYTES)
                if not data:
                    chunk, rest = rest, b""
                    if not chunk:
                        break
                else:
                    buf = rest + data
                    cut = buf.rfind(b"\n") + 1
                    if cut == 0:  # one line longer than a block: keep reading
                        rest = buf
                        if len(rest) > self.max_record_bytes:
                            rest = rest[:self.max_record_bytes + 1] + self._skip_line(stream)
                        continue
                    chunk, rest = buf[:cut], buf[cut:]
                n = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
                a, b = line, line + n
                line = b
                if hi is not None and a >= hi:
                    break
                if b <= lo:
                    continue
                first = a
                if a < lo:  # cut the lines before the range
                    chunk = chunk[_nth_newline(chunk, lo - a):]
                    first = lo
                if hi is not None and b > hi:
                    chunk = chunk[:_nth_newline(chunk, hi - first)]
                yield Block(self.path, first + 1, data=chunk, done_bytes=self.bytes_read,
                            max_record_bytes=self.max_record_bytes)
                if not data:
                    break
        except (OSError, EOFError) as e:  # truncated gzip/zstd streams, bad magic
            raise SourceError(f"cannot read ({e})", path=self.path, reason="unreadable") from None
        finally:
            stream.close()
        if hi is None and lo == 0:
            self._finished()


    @staticmethod
    def _skip_line(stream: BinaryIO) -> bytes:
        """Read past the end of the current line; return what follows its newline."""
        while data := stream.read(BLOCK_BYTES):
            j = data.find(b"\n")
            if j >= 0:
                return data[j:]
        return b""


class _ZstdFrames(io.RawIOBase):
    """A zstandard stream of one or more frames, decompressed as it is read.

    Unlike ``ZstdDecompressor().stream_reader``, which ends quietly where a truncated file ends,
    this raises EOFError when the input stops inside a frame, so a cut ``.zst`` is reported as
    unreadable instead of losing its tail.
    """

    def __init__(self, raw: BinaryIO, zstandard: Any) -> None:
        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.dobj = self.dctx.decompressobj()
        self.pending = b""  # decompressed bytes, returned from offset `pos` on
        self.pos = 0
        self.in_frame = False  # input consumed since the last completed frame

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.pos == len(self.pending):
            data = self.raw.read(256 << 10)  # small steps keep the read-ahead thread streaming
            if not data:
                if self.in_frame:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            parts = []
            while data:
                self.in_frame = True
                parts.append(self.dobj.decompress(data))
                if self.dobj.eof:  # a frame ended; what follows starts the next one
                    data = self.dobj.unused_data
                    self.dobj = self.dctx.decompressobj()
                    self.in_frame = False
                else:
                    data = b""
            self.pending, self.pos = b"".join(parts), 0
        n = min(len(b), len(self.pending) - self.pos)
        b[:n] = memoryview(self.pending)[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _ReadAhead:
    """Reads fixed-size chunks of a stream in a background thread, ``depth`` chunks ahead.

    Decompression (zlib, zstd) and file reads release the GIL, so the next chunk is decompressed
    while the caller splits and dispatches the current one: the main process of a parallel build
    stops waiting on its input. ``read()`` returns the next chunk (at most ``size`` bytes, ``b""``
    at the end) and re-raises the reader's error, if any, in the caller's thread.

    Its owner calls :meth:`close` on every exit path (``JsonlSource.blocks`` does, in a ``finally``
    that runs when the generator is closed): a thread still inside a buffered read when the
    interpreter shuts down aborts the process (``Fatal Python error: _enter_buffered_busy``).
    """

    def __init__(self, stream: BinaryIO, size: int, depth: int = 4) -> None:
        self.stream = stream
        self.size = size
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, name="pairpack-read-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                data = self.stream.read(self.size)
                self.q.put(data)
                if not data:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.q.put(e)

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        item = self.q.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if not item:
            self.done = True
        return item

    def close(self) -> None:
        """Stop the thread (draining what it queued), then close the stream."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.01)
            except queue.Empty:
                pass
        self.stream.close()


def _nth_newline(chunk: bytes, k: int) -> int:
    """Offset just after the k-th newline of ``chunk`` (k >= 1), or len(chunk)."""
    pos = 0
    for _ in range(k):
        j = chunk.find(b"\n", pos)
        if j < 0:
            return len(chunk)
        pos = j + 1
    return pos


class JsonArraySource(_FileSource):
    """A ``.json`` file holding one array of records. Units are array elements.

    Files up to :data:`JSON_SLURP_BYTES` are parsed at once; larger ones are streamed element by
    element (``json.JSONDecoder.raw_decode`` over a sliding buffer), so memory stays bounded by
    the largest element, not the file.
    """

    slurp_bytes = JSON_SLURP_BYTES

    def _elements(self) -> Iterator[Any]:
        if self.size <= self.slurp_bytes:
            stream = self._open()
            try:
                data = stream.read()
            finally:
                stream.close()
            try:
                arr = _loads(data)
            except _JSONError as e:
                hint = f"; {_JSONL_HINT}" if _looks_like_jsonl(data[:1 << 20]) else ""
                raise SourceError(f"malformed JSON ({_short(e)}){hint}", path=self.path,
                                  reason="malformed_json") from None
            if not isinstance(arr, list):
                raise SourceError(f"a .json input must hold an array of records, not one {type(arr).__name__}"
                                  " (records one per line are JSON Lines: name the file .jsonl)", path=self.path,
                                  reason="malformed_json")
            self._finished()
            yield from arr
            return
        yield from self._stream()

    def _stream(self) -> Iterator[Any]:
        stream = self._open()
        dec = codecs.getincrementaldecoder("utf-8")()
        dj = json.JSONDecoder()
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            data = stream.read(BLOCK_BYTES)
            eof = not data
            buf = buf[pos:] + dec.decode(data, final=eof)
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        def bad(msg: str) -> SourceError:
            return SourceError(f"malformed JSON ({msg})", path=self.path, reason="malformed_json")

        try:
            skip_ws()
            if pos >= len(buf) or buf[pos] != "[":
                hint = _JSONL_HINT if _looks_like_jsonl(buf[pos:pos + (1 << 20)].encode()) else \
                    "records one per line are JSON Lines: name the file .jsonl"
                raise SourceError(f"a .json input must hold an array of records; {hint}", path=self.path,
                                  reason="malformed_json")
            pos += 1
            n = 0
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                pos += 1
            else:
                while True:
                    skip_ws()
                    while True:
                        try:
                            v, end = dj.raw_decode(buf, pos)
                        except ValueError as e:
                            if more():
                                continue
                            raise bad(f"element {n + 1}: {_short(e)}") from None
                        # a number cut by a read ("0" of "0.5") parses short: retry with more text
                        # unless the element is visibly complete (followed by a separator)
                        if (end >= len(buf) or buf[end] not in " \t\r\n,]") and more():
                            continue
                        break
                    n += 1
                    pos = end
                    yield v
                    skip_ws()
                    if pos >= len(buf):
                        raise bad("unterminated array")
                    if buf[pos] == "]":
                        pos += 1
                        break
                    if buf[pos] != ",":
                        raise bad(f"expected ',' or ']' after element {n}, found {buf[pos]!r}")
                    pos += 1
            skip_ws()
            if pos < len(buf):
                raise bad("extra data after the array")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read ({e})", path=self.path, reason="unreadable") from None
        finally:
            stream.close()
        self._finished()

    def units(self) -> int:
        return sum(1 for _ in self._elements())

    def blocks(self, lo: int = 0, hi: int | None = None) -> Iterator[Block]:
        recs: list[tuple[int, Any]] = []
        for i, v in enumerate(self._elements()):
            if hi is not None and i >= hi:
                break
            if i < lo:
                continue
            recs.append((i + 1, v))
            if len(recs) >= BLOCK_RECORDS:
                yield Block(self.path, recs[0][0], records=recs, done_bytes=self.bytes_read)
                recs = []
        if recs:
            yield Block(self.path, recs[0][0], records=recs, done_bytes=self.bytes_read)


def _pyarrow_parquet() -> Any:
    return import_optional("pyarrow.parquet", feature="reading Parquet", extra="parquet")


class ParquetSource(_FileSource):
    """A Parquet file, read in record batches (pyarrow). Units are rows; row groups outside a
    requested range are not read at all."""

    def _file(self) -> Any:
        pq = _pyarrow_parquet()
        try:
            return pq.ParquetFile(self.file)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends
            raise SourceError(f"not a readable Parquet file ({_short(e)})", path=self.path,
                              reason="unreadable") from None

    def units(self) -> int:
        return int(self._file().metadata.num_rows)

    def blocks(self, lo: int = 0, hi: int | None = None) -> Iterator[Block]:
        pf = self._file()
        md = pf.metadata
        hi = md.num_rows if hi is None else min(hi, md.num_rows)
        start = 0
        done = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            a, b = start, start + n
            start = b
            if b <= lo or a >= hi:
                continue
            row = a
            try:
                batches = pf.iter_batches(batch_size=BLOCK_RECORDS, row_groups=[g])
                for batch in batches:
                    rows = batch.to_pylist()
                    recs = [(row + i + 1, r) for i, r in enumerate(rows) if lo <= row + i < hi]
                    row += len(rows)
                    if recs:
                        yield Block(self.path, recs[0][0], records=recs, done_bytes=done)
            except SourceError:
                raise
            except Exception as e:  # noqa: BLE001
                raise SourceError(f"cannot read Parquet row group {g} ({_short(e)})", path=self.path,
                                  reason="unreadable") from None
            done += md.row_group(g).total_byte_size


class RecordsSource(Source):
    """In-memory records: a Hugging Face ``datasets.Dataset`` (rows read in slices) or any sequence
    of dicts. Units are rows."""

    def __init__(self, obj: Any, name: str | None = None) -> None:
        self.obj = obj
        self.is_hf = hasattr(obj, "_fingerprint") and hasattr(obj, "column_names")
        self.fingerprint = getattr(obj, "_fingerprint", None)  # the caller's object, before with_format
        if self.is_hf and hasattr(obj, "with_format"):
            self.obj = obj.with_format(None)  # plain Python values, whatever format the caller set
        self.path = name or (f"<datasets.Dataset {getattr(obj, '_fingerprint', '')}>" if self.is_hf else "<records>")
        self.size = 0

    def units(self) -> int:
        try:
            return len(self.obj)
        except TypeError:
            raise SourceError("an iterable of records without a length cannot be split into shards",
                              path=self.path, reason="unsized") from None

    def blocks(self, lo: int = 0, hi: int | None = None) -> Iterator[Block]:
        if self.is_hf:
            n = len(self.obj)
            hi = n if hi is None else min(hi, n)
            for a in range(lo, hi, BLOCK_RECORDS):
                b = min(a + BLOCK_RECORDS, hi)
                cols = self.obj[a:b]  # dict of column lists
                names = list(cols)
                rows = [dict(zip(names, vals)) for vals in zip(*(cols[k] for k in names))] if names else []
                yield Block(self.path, a + 1, records=[(a + i + 1, r) for i, r in enumerate(rows)])
            return
        recs: list[tuple[int, Any]] = []
        for i, r in enumerate(self.obj):
            if hi is not None and i >= hi:
                break
            if i < lo:
                continue
            recs.append((i + 1, r))
            if len(recs) >= BLOCK_RECORDS:
                yield Block(self.path, recs[0][0], records=recs)
                recs = []
        if recs:
            yield Block(self.path, recs[0][0], records=recs)

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        if self.is_hf:
            out["datasets_fingerprint"] = self.fingerprint
        try:
            out["rows"] = len(self.obj)
        except TypeError:
            pass
        return out


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths in order; a directory contributes its supported files (recursively), sorted by
    relative path."""
    out: list[Path] = []
    suffixes = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            found = sorted((q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(suffixes)
                            and not any(part.startswith(".") for part in q.relative_to(p).parts)),
                           key=lambda q: q.relative_to(p).as_posix())
            if not found:
                raise SourceError(f"directory holds no input files ({', '.join(suffixes)})", path=p,
                                  reason="missing_file")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise SourceError("input file not found", path=p, reason="missing_file")
    if not out:
        raise SourceError("no input files", path=", ".join(map(str, inputs)), reason="missing_file")
    return out


# formats users try that pairpack does not read: (file name endings, leading bytes, name, how to convert)
_TO_JSONL = "convert it to JSON Lines or Parquet (one record per line/row with prompt/chosen/rejected fields)"
_FOREIGN = (
    ((".csv", ".tsv"), (), "CSV/TSV", "pandas.read_csv(FILE).to_json('FILE.jsonl', orient='records', lines=True), "
     "or " + _TO_JSONL),
    ((".arrow", ".feather", ".ipc"), (b"ARROW1",), "Arrow IPC", "datasets.load_from_disk(DIR) or "
     "datasets.Dataset.from_file(FILE), then pass the Dataset to pairpack.build(), or write it as Parquet"),
    ((".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"), (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a"),
     "an image (PNG, JPEG, GIF, ...)", "pairpack reads preference records, not media"),
    ((".xlsx", ".xls"), (), "a spreadsheet", "export it as CSV, then " + _TO_JSONL),
    ((".pdf",), (b"%PDF",), "a PDF document", _TO_JSONL),
    ((".zip", ".tar", ".tar.gz", ".tgz"), (b"PK\x03\x04",), "an archive", "extract it and pass the files or their "
     "directory"),
    ((".txt", ".md"), (), "plain text", _TO_JSONL),
    ((".pkl", ".pickle", ".pt", ".npy", ".npz", ".safetensors"), (), "a binary Python/numpy/torch file",
     "pairpack never unpickles or loads binary objects: " + _TO_JSONL),
)


def unsupported_format(p: Path) -> str | None:
    """Why ``p`` is a format pairpack does not read (by its name, or by its first bytes for files
    named as inputs), with how to convert it; None for JSON Lines, JSON and Parquet."""
    name = p.name.lower()
    if name.endswith(PARQUET_SUFFIXES) or (name.endswith(JSONL_SUFFIXES) and not name.endswith((".jsonl", ".ndjson"))):
        return None  # compressed JSON Lines and Parquet: their readers say what is wrong with them
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    for ends, magic, what, fix in _FOREIGN:
        if name.endswith(ends) or any(head.startswith(m) for m in magic):
            return (f"{what} is not an input format pairpack reads (JSON Lines .jsonl/.jsonl.gz/.jsonl.zst, JSON "
                    f"arrays .json, Parquet): {fix}")
    return None


def _file_source(p: Path) -> Source:
    name = p.name.lower()
    why = unsupported_format(p)
    if why is not None:
        raise SourceError(why, path=p, reason="unsupported_format")
    if name.endswith(PARQUET_SUFFIXES):
        return ParquetSource(p)
    if name.endswith(JSON_SUFFIXES):
        return JsonArraySource(p)
    return JsonlSource(p)  # .jsonl and anything else given explicitly: JSON Lines


def open_sources(inputs: Any) -> list[Source]:
    """Sources for ``inputs``: a path, a ``datasets.Dataset``, a list of records (dicts), or a
    sequence mixing paths and datasets."""
    if isinstance(inputs, (str, os.PathLike)) or _is_records(inputs):
        inputs = [inputs]
    paths: list[Any] = []
    out: list[Source] = []

    def flush() -> None:
        out.extend(_file_source(p) for p in expand_inputs(paths))
        paths.clear()

    for x in inputs:
        if isinstance(x, (str, os.PathLike)):
            paths.append(x)
        elif _is_records(x):
            if paths:
                flush()
            out.append(RecordsSource(x))
        else:
            raise SourceError(f"unsupported input of type {type(x).__name__}", reason="wrong_type")
    if paths:
        flush()
    if not out:
        raise SourceError("no inputs", reason="missing_file")
    return out


def _is_records(x: Any) -> bool:
    if hasattr(x, "_fingerprint") and hasattr(x, "column_names"):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(r, dict) for r in x[:8])


def _short(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:160]
