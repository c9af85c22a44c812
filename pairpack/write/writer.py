"""Streaming, atomic writer of pairpack datasets (FORMAT.md §9).
Memory stays flat whatever the input size: tokens and index columns go to disk as they arrive,
and prompt de-duplication uses a bounded window of recent prompts (FORMAT.md §7.2). The dataset
is assembled in a temporary directory beside the target and renamed into place only when every
file is written, fsynced and checksummed."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xxhash

from .. import format as fmt
from ..errors import ArgumentError, SourceError, StateError
from ..format.fsio import (
    _fsync_close,
    _fsync_dir,
    check_output,
    clean_stale_temps,
    install_dir,
    temp_path_for,
    write_manifest,
)

__all__ = ["Writer"]

_FLUSH_BYTES = 4 << 20
_SPILL_ROWS = 1 << 16


def check_ids(ids: Any, field: str, vocab_size: int | None) -> np.ndarray:
    """Validate one segment of token ids and return it as a 1-D int64 array.

    Raises SourceError (reason "empty", "bad_id", "id_range") naming ``field``. Range checks happen
    before any narrowing cast, so an id is never wrapped (FORMAT.md §9 W3).
    """
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as e:
        raise SourceError(f"not a list of token ids ({e})", field=field, reason="bad_id") from None
    if arr.ndim != 1:
        raise SourceError("token ids must be a flat list", field=field, reason="bad_id")
    if arr.size == 0:
        raise SourceError("segment is empty", field=field, reason="empty")
    if arr.dtype.kind not in "iu":
        if arr.dtype == object:  # Python ints beyond int64, or mixed types
            if not all(type(v) is int for v in arr.tolist()):
                raise SourceError("token ids must be integers", field=field, reason="bad_id")
            lo, hi = min(arr.tolist()), max(arr.tolist())
            bad = lo if lo < 0 else hi
            raise SourceError(f"token id {bad} is out of range", field=field, reason="id_range")
        raise SourceError(f"token ids must be integers, got {arr.dtype.name} values", field=field,
                          reason="bad_id")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) >= 2**63:
        raise SourceError(f"token id {int(arr.max())} is out of range", field=field, reason="id_range")
    arr = arr.astype(np.int64, copy=False)
    lo = int(arr.min())
    if lo < 0:
        raise SourceError(f"negative token id {lo}", field=field, reason="id_range")
    if vocab_size is not None:
        hi = int(arr.max())
        if hi >= vocab_size:
            raise SourceError(f"token id {hi} >= vocab_size {vocab_size}", field=field, reason="id_range")
    return arr


class _Spill:
    """An append-only int64/float column spilled to a raw file in fixed-size chunks."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.buf = np.empty(_SPILL_ROWS, dtype=self.dtype)
        self.n = 0  # rows in buf
        self.total = 0
        self.f = open(path, "wb")

    def append(self, v: Any) -> None:
        self.buf[self.n] = v
        self.n += 1
        self.total += 1
        if self.n == _SPILL_ROWS:
            self.flush()

    def extend(self, values: np.ndarray) -> None:
        """Append many values; the bytes written equal those of ``append`` called per value."""
        arr = np.asarray(values, dtype=self.dtype)
        while len(arr):
            take = min(len(arr), _SPILL_ROWS - self.n)
            self.buf[self.n:self.n + take] = arr[:take]
            self.n += take
            self.total += take
            arr = arr[take:]
            if self.n == _SPILL_ROWS:
                self.flush()

    def flush(self) -> None:
        if self.n:
            self.f.write(self.buf[: self.n].tobytes())
            self.n = 0

    def close(self) -> None:
        self.flush()
        self.f.close()


class _ShardWriter:
    """Writes one shard directory: tokens.npy, starts.npy, lengths.npy, column files."""

    def __init__(self, directory: Path, name: str, dtype: str, columns: Mapping[str, str],
                 dedup_window: int) -> None:
        self.dir = directory / name
        self.dir.mkdir()
        self.name = name
        self.dtype = fmt.TOKEN_DTYPES[dtype]
        self.tok_path = self.dir / fmt.TOKENS_FILE
        self.tok = open(self.tok_path, "w+b")
        self.tok.write(b"\0" * fmt.NPY_HEADER_BYTES)  # header is written last, when T is known
        self.pending: list[np.ndarray] = []
        self.pending_bytes = 0
        self.flushed_tokens = 0
        self.num_tokens = 0
        self.num_prompts = 0
        self.cols = [_Spill(self.dir / f".{k}.spill", fmt.INDEX_DTYPE)
                     for k in ("ps", "cs", "rs", "pl", "cl", "rl")]
        self.extra = {k: _Spill(self.dir / f".col-{k}.spill", fmt.COLUMN_DTYPES[v])
                      for k, v in columns.items()}
        self.dedup: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self.dedup_window = dedup_window

    @property
    def num_pairs(self) -> int:
        return self.cols[0].total

    def _append_tokens(self, ids: np.ndarray) -> int:
        start = self.num_tokens
        arr = ids.astype(self.dtype)
        self.pending.append(arr)
        self.pending_bytes += arr.nbytes
        self.num_tokens += len(arr)
        if self.pending_bytes >= _FLUSH_BYTES:
            self._flush_tokens()
        return start

    def _flush_tokens(self) -> None:
        if self.pending:
            self.tok.write(b"".join(a.tobytes() for a in self.pending))
            self.flushed_tokens = self.num_tokens
            self.pending.clear()
            self.pending_bytes = 0

    def _stored(self, start: int, length: int) -> np.ndarray:
        if start + length > self.flushed_tokens:
            self._flush_tokens()
        self.tok.flush()
        raw = os.pread(self.tok.fileno(), length * self.dtype.itemsize,
                       fmt.NPY_HEADER_BYTES + start * self.dtype.itemsize)
        return np.frombuffer(raw, dtype=self.dtype)

    def prompt_start(self, prompt: np.ndarray) -> int:
        """Start of ``prompt`` in tokens: an earlier identical prompt's, or a new copy's (§7.2)."""
        if self.dedup_window <= 0:
            self.num_prompts += 1
            return self._append_tokens(prompt)
        key = (len(prompt), xxhash.xxh3_128_digest(prompt.astype(np.uint32).tobytes()))
        start = self.dedup.get(key)
        # a hash hit is confirmed against the stored tokens: de-duplication is exact
        if start is not None and np.array_equal(self._stored(start, len(prompt)), prompt):
            self.dedup.move_to_end(key)
            return start
        start = self._append_tokens(prompt)
        self.num_prompts += 1
        self.dedup[key] = start
        if len(self.dedup) > self.dedup_window:
            self.dedup.popitem(last=False)
        return start

    def add(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
            columns: Mapping[str, Any]) -> None:
        ps = self.prompt_start(prompt)
        cs = self._append_tokens(chosen)
        rs = self._append_tokens(rejected)
        for spill, v in zip(self.cols, (ps, cs, rs, len(prompt), len(chosen), len(rejected))):
            spill.append(v)
        for k, spill in self.extra.items():
            spill.append(columns[k])

    def add_group(self, prompt: np.ndarray, completions: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]],
                  columns: Mapping[str, Sequence[Any]]) -> None:
        """Pairs over one prompt whose completions they share: each completion is stored once, at the
        first pair that uses it (W5 with shared completions, FORMAT.md §7.6)."""
        ps = self.prompt_start(prompt)
        stored: dict[int, int] = {}
        for ci, ri in pairs:
            for k in (ci, ri):
                if k not in stored:
                    stored[k] = self._append_tokens(completions[k])
            for spill, v in zip(self.cols, (ps, stored[ci], stored[ri], len(prompt), len(completions[ci]),
                                            len(completions[ri]))):
                spill.append(v)
        for k, spill in self.extra.items():
            spill.extend(np.asarray(columns[k], dtype=spill.dtype))

    def add_batch(self, tokens: np.ndarray, off: np.ndarray, lens: list[list[int]], i0: int, n: int,
                  shard_bytes: int, columns: Mapping[str, np.ndarray]) -> int:
        """Append pairs ``i0, i0+1, ...`` of a batch until the shard is full; returns the next pair.

        ``tokens`` holds each pair's prompt, chosen and rejected ids back to back, pair ``j`` from
        ``off[j]``; ``lens`` = lengths as three lists. Byte-for-byte the same files as :meth:`add`
        per pair (same dedup decisions, same shard cut), but Python work per pair is only the
        prompt's hash and dict lookup: tokens are cut and written once per batch.
        """
        self._flush_tokens()  # earlier per-pair tokens go first; _stored reads them from the file
        pls, cls, rls = lens
        item = self.dtype.itemsize
        window = self.dedup_window
        base = nt = self.num_tokens
        had = self.num_pairs
        # prompts are hashed through a memoryview (slicing one costs a third of a numpy slice)
        key_src = memoryview(np.ascontiguousarray(tokens, dtype=np.uint32)) if window > 0 else None
        offs = off.tolist()
        ps: list[int] = []
        cs: list[int] = []
        rs: list[int] = []
        drop: list[int] = []  # batch offsets of prompts stored once already (not written again)
        drop_len: list[int] = []
        fresh: dict[int, int] = {}  # output start -> batch offset, prompts first written in this batch
        dedup = self.dedup
        digest = xxhash.xxh3_128_digest
        j = i0
        while j < n:
            pl, cl, rl = pls[j], cls[j], rls[j]
            if (had or j > i0) and (nt + pl + cl + rl) * item > shard_bytes:
                break
            a = offs[j]
            if window <= 0:
                start = nt
                nt += pl
                self.num_prompts += 1
            else:
                key = (pl, digest(key_src[a:a + pl]))  # type: ignore[index]
                start = dedup.get(key)
                if start is not None:
                    # a hash hit is confirmed against the stored tokens: de-duplication is exact
                    src = fresh.get(start)
                    earlier = (tokens[src:src + pl] if start >= base and src is not None
                               else self._stored(start, pl))
                    if not np.array_equal(earlier, tokens[a:a + pl]):
                        start = None
                if start is not None:
                    dedup.move_to_end(key)
                    drop.append(a)
                    drop_len.append(pl)
                else:
                    start = nt
                    nt += pl
                    self.num_prompts += 1
                    dedup[key] = start
                    fresh[start] = a
                    if len(dedup) > window:
                        dedup.popitem(last=False)
            ps.append(start)
            cs.append(nt)
            nt += cl
            rs.append(nt)
            nt += rl
            j += 1
        if j == i0:
            return j
        lo, hi = offs[i0], offs[j]
        part = tokens[lo:hi]
        if drop:  # remove the repeated prompts' ranges: +1 at each start, -1 at each end
            mark = np.zeros(hi - lo + 1, dtype=np.int8)
            d = np.asarray(drop, dtype=np.int64) - lo
            mark[d] = 1
            mark[d + np.asarray(drop_len, dtype=np.int64)] = -1  # never another start: segments >= 1
            part = part[np.cumsum(mark[:-1]) == 0]
        self.tok.write(part.astype(self.dtype, copy=False).tobytes())
        self.num_tokens = self.flushed_tokens = nt
        for spill, v in zip(self.cols, (ps, cs, rs, pls[i0:j], cls[i0:j], rls[i0:j])):
            spill.extend(np.asarray(v, dtype=np.int64))
        for k, spill in self.extra.items():
            spill.extend(columns[k][i0:j])
        return j

    def widen(self) -> None:
        """Rewrite the tokens written so far as uint32 (once, when an id >= 65536 first appears)."""
        self._flush_tokens()
        self.tok.flush()
        old = np.fromfile(self.tok_path, dtype=self.dtype, offset=fmt.NPY_HEADER_BYTES,
                          count=self.flushed_tokens) if self.flushed_tokens else np.zeros(0, self.dtype)
        self.dtype = fmt.TOKEN_DTYPES["uint32"]
        self.tok.seek(fmt.NPY_HEADER_BYTES)
        self.tok.truncate()
        self.tok.write(old.astype(self.dtype).tobytes())

    def finish(self) -> tuple[dict[str, Path], dict[str, Path]]:
        """Close the shard: write headers, assemble index files, return file paths."""
        self._flush_tokens()
        self.tok.seek(0)
        self.tok.write(fmt.npy_header(self.dtype, (self.num_tokens,)))
        _fsync_close(self.tok)
        n = self.num_pairs
        for spill in self.cols:
            spill.close()
        for spill in self.extra.values():
            spill.close()
        out = {"tokens": self.tok_path}
        for key, fname, group in (("starts", fmt.STARTS_FILE, self.cols[:3]),
                                  ("lengths", fmt.LENGTHS_FILE, self.cols[3:])):
            out[key] = self.dir / fname
            _concat_npy(out[key], fmt.INDEX_DTYPE, (3, n), [s.path for s in group])
        cols = {}
        for k, spill in self.extra.items():
            cols[k] = self.dir / f"{k}.npy"
            _concat_npy(cols[k], spill.dtype, (n,), [spill.path])
        return out, cols

    def abort(self) -> None:
        for f in [self.tok] + [s.f for s in self.cols] + [s.f for s in self.extra.values()]:
            try:
                f.close()
            except OSError:
                pass


def _check_finite(dtypes: Mapping[str, str], values: Mapping[str, Any], first_pair: int) -> None:
    """Refuse NaN/inf in float columns before anything is written: the reader's R16 rejects them,
    and the writer must never emit a dataset that its own ``verify()`` fails (FORMAT.md §8 R16)."""
    for name, dt in dtypes.items():
        if fmt.COLUMN_DTYPES[dt].kind != "f":
            continue
        with np.errstate(over="ignore"):  # 1e300 in a float32 column becomes inf: refuse it too
            v = np.asarray(values[name]).astype(fmt.COLUMN_DTYPES[dt])
        bad = np.flatnonzero(~np.isfinite(v.reshape(-1)))
        if bad.size:
            raise ArgumentError(f"column {name!r}: non-finite value {v.reshape(-1)[bad[0]]} at pair "
                             f"{first_pair + int(bad[0])} (FORMAT.md §8 R16)")


def _file_entry(root: Path, p: Path) -> fmt.FileEntry:
    return fmt.FileEntry(p.relative_to(root).as_posix(), p.stat().st_size, fmt.file_checksum(p))


def _widen_closed(root: Path, shard: fmt.ShardInfo) -> fmt.ShardInfo:
    """Rewrite a finished shard's uint16 tokens as uint32 (its checksum entry is renewed)."""
    path = root / shard.files["tokens"].path
    old = np.load(path, mmap_mode="r", allow_pickle=False)
    if old.dtype == fmt.TOKEN_DTYPES["uint32"]:
        return shard
    tmp = path.with_suffix(".widen")
    with open(tmp, "wb") as f:
        f.write(fmt.npy_header(fmt.TOKEN_DTYPES["uint32"], (len(old),)))
        for i in range(0, len(old), 1 << 22):
            f.write(np.asarray(old[i:i + (1 << 22)], dtype=fmt.TOKEN_DTYPES["uint32"]).tobytes())
        f.flush()
        os.fsync(f.fileno())
    del old
    os.replace(tmp, path)
    files = dict(shard.files)
    files["tokens"] = _file_entry(root, path)
    return fmt.ShardInfo(shard.name, shard.num_pairs, shard.num_tokens, shard.num_prompts, files,
                         shard.columns)




def _concat_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...], parts: Sequence[Path]) -> None:
    with open(path, "wb") as out:
        out.write(fmt.npy_header(dtype, shape))
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
            os.unlink(p)
        out.flush()
        os.fsync(out.fileno())




class Writer:
    """Write pairs into a new pairpack dataset directory, atomically.

    Use as a context manager; leaving the block normally commits, an exception aborts and leaves
    nothing behind::

        with pairpack.Writer("out", vocab_size=50257, pad_id=50256) as w:
            w.add([1, 2, 3], [4, 5], [6])

    Args:
        path: the dataset directory to create.
        vocab_size: ids must be below it; picks the token dtype (FORMAT.md §4.1). When None, ids
            are checked against 2**32, the dtype starts as uint16 and widens once if a larger id
            appears, and the manifest records ``max id + 1``.
        pad_id: the pad id recorded in the manifest (§5.1).
        bos_id: the BOS id recorded in the manifest, or None.
        eos_id: the EOS id recorded in the manifest, or None.
        tokenizer: the tokenizer identity object recorded in the manifest (§5.2), or None.
        columns: per-pair columns to write, name -> dtype name (§4.4); values are given to ``add``.
        column_info: optional description/attrs per column name.
        force: replace an existing dataset at ``path``.
        shard_bytes: start a new shard once a shard's tokens reach this many bytes.
        dedup_window: how many recent distinct prompts are remembered for de-duplication (§7.2).
        provenance: the object stored as manifest "provenance" (§5.5).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int | None = None,
        pad_id: int = 0,
        bos_id: int | None = None,
        eos_id: int | None = None,
        tokenizer: dict[str, Any] | None = None,
        columns: Mapping[str, str] | None = None,
        column_info: Mapping[str, Mapping[str, Any]] | None = None,
        force: bool = False,
        shard_bytes: int = 1 << 30,
        dedup_window: int = 1 << 16,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        check_output(self.path, force=force)  # before any work: a user's directory is never replaced (§9 W8)
        if vocab_size is not None:
            fmt.token_dtype_for_vocab(vocab_size)
        for name, v in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if v is not None and (v < 0 or (vocab_size is not None and v >= vocab_size)):
                raise ArgumentError(f"{name}={v} must be in [0, vocab_size)")
        self.columns = dict(columns or {})
        for k, v in self.columns.items():
            if not fmt.COLUMN_NAME_RE.match(k) or v not in fmt.COLUMN_DTYPES:
                raise ArgumentError(f"bad column {k!r}: {v!r} (names [a-z][a-z0-9_]*, dtypes {sorted(fmt.COLUMN_DTYPES)})")
        self.column_info = dict(column_info or {})
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.tokenizer = tokenizer
        self.force = force
        self.shard_bytes = shard_bytes
        self.dedup_window = dedup_window
        self.provenance = dict(provenance or {})
        self.max_id = max(v for v in (pad_id, bos_id, eos_id, 0) if v is not None)
        self.dtype = fmt.token_dtype_for_vocab(vocab_size or self.max_id + 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.path)
        self.tmp = temp_path_for(self.path)
        self.tmp.mkdir()
        self.shards: list[fmt.ShardInfo] = []
        self.current: _ShardWriter | None = None
        self.num_pairs = 0
        self.manifest: fmt.Manifest | None = None
        self._closed = False

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add(self, prompt: Any, chosen: Any, rejected: Any, **columns: Any) -> int:
        """Append one pair; returns its index. Segments are sequences of ids (≥ 1 each).

        Raises SourceError (with ``field`` set) for an invalid segment; nothing is written then.
        """
        if self._closed:
            raise StateError(f"{self.path}: writer is closed")
        limit = self.vocab_size if self.vocab_size is not None else fmt.MAX_VOCAB
        p = check_ids(prompt, "prompt", limit)
        c = check_ids(chosen, "chosen", limit)
        r = check_ids(rejected, "rejected", limit)
        missing = set(self.columns) - set(columns)
        if missing or set(columns) - set(self.columns):
            raise ArgumentError(f"columns given {sorted(columns)} differ from declared {sorted(self.columns)}")
        _check_finite(self.columns, columns, self.num_pairs)
        return self.add_checked(p, c, r, columns)

    def add_checked(self, p: np.ndarray, c: np.ndarray, r: np.ndarray,
                    columns: Mapping[str, Any] = {}) -> int:
        """Append a pair whose segments already passed :func:`check_ids` (int64, non-empty)."""
        self._see_max(max(int(p.max()), int(c.max()), int(r.max())))
        sw = self._shard_for(len(p) + len(c) + len(r))
        sw.add(p, c, r, columns)
        self.num_pairs += 1
        return self.num_pairs - 1

    def _see_max(self, hi: int) -> None:
        """Record the largest id so far; widen uint16 to uint32 when an id needs it."""
        if hi > self.max_id:
            self.max_id = hi
            if self.vocab_size is None and hi >= fmt.UINT16_MAX_VOCAB and self.dtype == "uint16":
                self.dtype = "uint32"
                if self.current is not None:
                    self.current.widen()
                self.shards = [_widen_closed(self.tmp, s) for s in self.shards]

    def add_group(self, prompt: np.ndarray, completions: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]],
                  columns: Mapping[str, Sequence[Any]] | None = None) -> None:
        """Append pairs that share one prompt and a set of completions, each completion stored once.

        The multi-completion layout (FORMAT.md §7.6): pair ``k`` is ``(prompt, completions[i],
        completions[j])`` for ``(i, j) = pairs[k]``; a completion is written at the first pair that
        uses it and later pairs point at it. All the group's pairs go into one shard.

        Args:
            prompt: int64 ids, checked (:func:`check_ids`), non-empty.
            completions: int64 id arrays, checked, non-empty; the distinct completions.
            pairs: ``(chosen index, rejected index)`` per pair.
            columns: per declared column, one value per pair.
        """
        if self._closed:
            raise ValueError("writer is closed")
        if not pairs:
            return
        columns = dict(columns or {})
        if set(columns) != set(self.columns):
            raise ValueError(f"columns given {sorted(columns)} differ from declared {sorted(self.columns)}")
        used = sorted({k for pr in pairs for k in pr})
        self._see_max(max([int(prompt.max())] + [int(completions[k].max()) for k in used]))
        _check_finite(self.columns, {k: np.asarray(v) for k, v in columns.items()}, self.num_pairs)
        sw = self._shard_for(len(prompt) + sum(len(completions[k]) for k in used))
        sw.add_group(prompt, completions, pairs, columns)
        self.num_pairs += len(pairs)

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray,
                  columns: Mapping[str, np.ndarray] | None = None) -> None:
        """Append many checked pairs at once; the files equal those of ``add_checked`` per pair.

        Args:
            tokens: 1-D unsigned/int array: each pair's prompt, chosen and rejected ids back to back,
                already checked (non-negative, below the vocabulary; every segment non-empty).
            lengths: int64 ``(3, n)``: prompt, chosen and rejected length of each pair.
            columns: per-pair column values, name -> ``(n,)`` array (the declared columns).
        """
        if self._closed:
            raise StateError(f"{self.path}: writer is closed")
        lengths = np.asarray(lengths, dtype=np.int64)
        n = lengths.shape[1]
        if n == 0:
            return
        columns = {k: np.asarray(v) for k, v in (columns or {}).items()}
        if set(columns) != set(self.columns):
            raise ArgumentError(f"columns given {sorted(columns)} differ from declared {sorted(self.columns)}")
        _check_finite(self.columns, columns, self.num_pairs)
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=0), out=off[1:])
        if off[-1] != len(tokens):
            raise ArgumentError(f"lengths add up to {int(off[-1])} tokens, got {len(tokens)}")
        hi = int(tokens.max())
        if hi > self.max_id:
            if self.vocab_size is None and hi >= fmt.UINT16_MAX_VOCAB and self.dtype == "uint16":
                # widen exactly where add_checked would: before the first pair holding such an id
                j = int(np.argmax(np.maximum.reduceat(tokens, off[:-1]) >= fmt.UINT16_MAX_VOCAB))
                if j > 0:
                    self.add_batch(tokens[:off[j]], lengths[:, :j], {k: v[:j] for k, v in columns.items()})
                    tokens, lengths = tokens[off[j]:], lengths[:, j:]
                    columns = {k: v[j:] for k, v in columns.items()}
                    off = off[j:] - off[j]
                    n -= j
                self.dtype = "uint32"
                if self.current is not None:
                    self.current.widen()
                self.shards = [_widen_closed(self.tmp, s) for s in self.shards]
            self.max_id = max(self.max_id, hi)
        lens = lengths.tolist()
        tot = lengths.sum(axis=0).tolist()
        i = 0
        while i < n:
            sw = self._shard_for(tot[i])
            k = sw.add_batch(tokens, off, lens, i, n, self.shard_bytes, columns)
            self.num_pairs += k - i
            i = k

    def _shard_for(self, ntok: int) -> _ShardWriter:
        sw = self.current
        if sw is not None and sw.num_pairs and (sw.num_tokens + ntok) * sw.dtype.itemsize > self.shard_bytes:
            self._close_shard()
            sw = None
        if sw is None:
            sw = self.current = _ShardWriter(self.tmp, f"shard-{len(self.shards):05d}", self.dtype,
                                             self.columns, self.dedup_window)
        return sw

    def _close_shard(self) -> None:
        sw = self.current
        assert sw is not None  # internal invariant, not validation
        files, cols = sw.finish()
        entry = lambda p: _file_entry(self.tmp, p)  # noqa: E731
        self.shards.append(fmt.ShardInfo(
            name=sw.name, num_pairs=sw.num_pairs, num_tokens=sw.num_tokens, num_prompts=sw.num_prompts,
            files={k: entry(v) for k, v in files.items()}, columns={k: entry(v) for k, v in cols.items()},
        ))
        _fsync_dir(sw.dir)
        self.current = None

    def commit(self) -> fmt.Manifest:
        """Finish every file, write the manifest, and move the dataset into place atomically."""
        if self._closed:
            raise StateError(f"{self.path}: writer is closed")
        try:
            if self.current is not None:
                self._close_shard()
            vocab = self.vocab_size if self.vocab_size is not None else self.max_id + 1
            manifest = fmt.Manifest(
                num_pairs=self.num_pairs, token_dtype=self.dtype, vocab_size=vocab, pad_id=self.pad_id,
                bos_id=self.bos_id, eos_id=self.eos_id, tokenizer=self.tokenizer,
                shards=tuple(self.shards),
                columns=tuple(fmt.ColumnInfo(k, v, str(self.column_info.get(k, {}).get("description", "")),
                                             dict(self.column_info.get(k, {}).get("attrs", {})))
                              for k, v in sorted(self.columns.items())),
                provenance=self.provenance,
            )
            write_manifest(self.tmp, manifest.dumps())
            self._install()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.manifest = manifest
        return manifest

    def _install(self) -> None:
        install_dir(self.tmp, self.path, force=self.force)

    def abort(self) -> None:
        """Discard everything written; the target path is left as it was."""
        if self.current is not None:
            self.current.abort()
            self.current = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True
