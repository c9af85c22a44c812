"""Lazy, zero-copy reader of pairpack datasets.

Opening reads the manifest and memory-maps each array after checking its header and size
(FORMAT.md §8): O(#shards) work, nothing proportional to the number of pairs or tokens. Every
read checks the coordinates it uses against the file it reads, so no access can leave a file
even when the index arrays are hostile; :meth:`Dataset.verify` checks everything up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from . import _accel, format as fmt
from .errors import ChecksumError, FormatError

__all__ = ["Pair", "Taken", "Dataset", "open_dataset", "verify_dataset"]


class Pair(NamedTuple):
    """One preference pair: three 1-D token views (uint16 or uint32) into the memory map."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass
class _Shard:
    info: fmt.ShardInfo
    tokens: np.ndarray  # (T,) token dtype
    starts: np.ndarray  # (3, n) int64
    lengths: np.ndarray  # (3, n) int64
    columns: dict[str, np.ndarray]
    dir: Path


class Taken(NamedTuple):
    """Pairs located for a batch (:meth:`Dataset.take`): ``indices`` int64 ``(B,)`` (non-negative),
    ``tokens`` the token array of each pair, ``starts``/``lengths`` int64 ``(3, B)`` (rows prompt,
    chosen, rejected), ``columns`` name -> ``(B,)`` values. Optional, when known: ``shards`` the
    distinct token arrays and ``shard_of`` int64 ``(B,)`` each pair's position in them (None: all
    in ``shards[0]``), ``longest`` the longest row ``max(P + C, P + R)``."""

    indices: np.ndarray
    tokens: list[np.ndarray]
    starts: np.ndarray
    lengths: np.ndarray
    columns: dict[str, np.ndarray]
    shards: tuple[np.ndarray, ...] | None = None
    shard_of: np.ndarray | None = None
    longest: int | None = None


class Dataset:
    """A pairpack dataset opened for reading (use :func:`pairpack.open`).

    ``len(ds)`` pairs; ``ds[i]`` is a :class:`Pair` of zero-copy views; ``ds.batch(indices)``
    assembles a :class:`~pairpack.Triplets`. Pickles by path (DataLoader workers re-map the
    files). :meth:`close` drops this object's maps; views already handed out stay valid.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = fmt.read_manifest(self.path)
        m = self.manifest
        self.token_dtype = fmt.TOKEN_DTYPES[m.token_dtype]
        self._shards: list[_Shard] = [_open_shard(self.path, m, i) for i in range(len(m.shards))]
        # bounds[k] = index of the first pair of shard k; bounds[-1] = len(ds)
        self._bounds = np.cumsum([0] + [s.num_pairs for s in m.shards], dtype=np.int64)
        self._joined: dict[str, np.ndarray] = {}  # per-pair arrays joined over shards, once each
        self._tokenizer: Any = None
        self._native_args: tuple[Any, ...] | None = None  # what the C kernels read (_native_shards)

    # --- basic protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.num_pairs

    def __repr__(self) -> str:
        m = self.manifest
        return (f"pairpack.Dataset({str(self.path)!r}, pairs={m.num_pairs}, shards={len(m.shards)}, "
                f"dtype={m.token_dtype}, vocab_size={m.vocab_size})")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (type(self), (str(self.path),))

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop this dataset's memory maps. Views handed out earlier keep their own mapping alive
        (numpy unmaps when the last view dies), so closing never invalidates them."""
        self._shards = []
        self._joined = {}
        self._native_args = None

    def _live(self) -> list[_Shard]:
        if not self._shards and self.manifest.shards:
            raise ValueError(f"{self.path}: dataset is closed")
        return self._shards

    @property
    def pad_id(self) -> int:
        return self.manifest.pad_id

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def fingerprint(self) -> str:
        """Identity of the pairs (FORMAT.md §7.3): equal for byte-identical token/index files."""
        return self.manifest.fingerprint()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.manifest.columns]

    def _locate(self, index: int) -> tuple[_Shard, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} pairs")
        k = int(np.searchsorted(self._bounds, index, side="right")) - 1
        return self._live()[k], index - int(self._bounds[k])

    def __getitem__(self, index: int) -> Pair:
        """Pair ``index`` as three zero-copy views. Raises FormatError if its index entry points
        outside the tokens file."""
        shard, j = self._locate(int(index))
        st = shard.starts[:, j]
        ln = shard.lengths[:, j]
        _check_segments(shard, st[:, None], ln[:, None], j)
        return Pair(*(shard.tokens[int(s):int(s) + int(l)] for s, l in zip(st, ln)))

    def __iter__(self) -> Iterator[Pair]:
        for i in range(len(self)):
            yield self[i]

    # --- flat per-pair arrays ----------------------------------------------------------------
    def _join(self, key: str, part: Callable[[_Shard], np.ndarray], empty: np.ndarray) -> np.ndarray:
        """A per-pair array over all shards: a zero-copy view for one shard; joined once (and
        cached) otherwise, so batches never pay O(N) for it."""
        if key not in self._joined:
            parts = [part(s) for s in self._live()]
            self._joined[key] = (parts[0] if len(parts) == 1 else
                                 np.concatenate(parts, axis=-1) if parts else empty)
        return self._joined[key]

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(3, N)``: prompt, chosen and rejected lengths of every pair (tokens).

        A zero-copy view for a one-shard dataset; concatenated once (and cached) otherwise.
        """
        return self._join("lengths", lambda s: s.lengths, np.zeros((3, 0), dtype=np.int64))

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self.lengths[fmt.PROMPT]

    @property
    def chosen_lengths(self) -> np.ndarray:
        return self.lengths[fmt.CHOSEN]

    @property
    def rejected_lengths(self) -> np.ndarray:
        return self.lengths[fmt.REJECTED]

    def column(self, name: str) -> np.ndarray:
        """Per-pair column ``name`` as a ``(N,)`` array (a view for one shard; joined once otherwise)."""
        if name not in self.column_names:
            raise KeyError(f"{self.path}: no column {name!r}; columns: {self.column_names}")
        dt = fmt.COLUMN_DTYPES[next(c.dtype for c in self.manifest.columns if c.name == name)]
        return self._join(f"column:{name}", lambda s: s.columns[name], np.zeros(0, dtype=dt))

    # --- batches -------------------------------------------------------------------------------
    def take(self, indices: Sequence[int] | np.ndarray, columns: Sequence[str] = ()) -> Taken:
        """Everything a batch of pairs ``indices`` needs, nothing copied from the tokens yet.

        Indices may be negative (from the end) and repeat; they are range-checked and every
        segment is bounds-checked, vectorised (FORMAT.md §8 R13). Used by :meth:`batch` and by the
        loader's plans.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if _accel.native is not None and idx.size:
            got = self._take_native(_accel.native, idx, columns)
            if got is not None:
                return got
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"pair index {int(bad)} out of range for {n} pairs")
        idx = np.where(idx < 0, idx + n, idx)
        cols = {c: np.asarray(self.column(c)[idx]) for c in columns}
        shards = self._live()
        if len(shards) == 1:  # the common case: no per-shard grouping (np.unique, nonzero, per-pair loop)
            sh = shards[0]
            st, ln = sh.starts[:, idx], sh.lengths[:, idx]
            _check_segments(sh, st, ln, idx)
            return Taken(idx, [sh.tokens] * idx.size, st, ln, cols)
        starts = np.empty((3, idx.size), dtype=np.int64)
        lengths = np.empty((3, idx.size), dtype=np.int64)
        tokens: list[np.ndarray] = [None] * idx.size  # type: ignore[list-item]
        k = np.searchsorted(self._bounds, idx, side="right") - 1
        for s in np.unique(k):
            sel = np.nonzero(k == s)[0]
            local = idx[sel] - self._bounds[s]
            sh = shards[int(s)]
            st, ln = sh.starts[:, local], sh.lengths[:, local]
            _check_segments(sh, st, ln, local)
            starts[:, sel], lengths[:, sel] = st, ln
            for i in sel.tolist():
                tokens[i] = sh.tokens
        return Taken(idx, tokens, starts, lengths, cols)

    def _native_shards(self) -> tuple[Any, ...]:
        """What the C kernels read, built once per open: per-shard (starts, lengths, token counts,
        tokens), and whether the kernels take this dataset's dtype and pad_id. Raises on a closed
        dataset, as every read does."""
        shards = self._live()
        if self._native_args is None:
            toks = tuple(s.tokens for s in shards)
            ok = bool(toks) and _accel.native_applies(toks, self.pad_id)  # dtypes, pad_id
            self._native_args = (tuple(s.starts for s in shards), tuple(s.lengths for s in shards),
                                 np.array([s.tokens.shape[0] for s in shards], dtype=np.int64), toks, ok)
        return self._native_args

    def _locate_native(self, nat: Any, idx: np.ndarray) -> tuple[np.ndarray, int] | None:
        """The C ``take``: coords int64 ``(8, B)`` (index, shard, 3 starts, 3 lengths) and the
        longest row; raises IndexError for an index out of range, None for a bad segment."""
        st, ln, ntok = (self._native_args or self._native_shards())[:3]
        coords = np.empty((8, idx.size), dtype=np.int64)
        try:
            return coords, nat.take(idx, self.manifest.num_pairs, self._bounds, st, ln, ntok, coords)
        except ValueError:
            return None

    def _take_native(self, nat: Any, idx: np.ndarray, columns: Sequence[str]) -> Taken | None:
        """:meth:`take` through the C kernel: one pass locates, range-checks and bounds-checks
        every pair. None when a segment is bad, so the numpy path raises the detailed error."""
        got = self._locate_native(nat, np.ascontiguousarray(idx))
        if got is None:
            return None
        coords, longest = got
        toks = self._native_shards()[3]
        idx = coords[0]
        cols = {c: np.asarray(self.column(c)[idx]) for c in columns}
        if len(toks) == 1:
            return Taken(idx, [toks[0]] * idx.size, coords[2:5], coords[5:8], cols, toks, None, longest)
        shard_of = coords[1]
        return Taken(idx, list(map(toks.__getitem__, shard_of.tolist())), coords[2:5], coords[5:8], cols, toks,
                     shard_of, longest)

    def _batch_native(self, nat: Any, indices: Sequence[int] | np.ndarray, pad_to_multiple_of: int | None,
                      columns: Sequence[str], max_length: int | None = None) -> "Triplets | None":
        """:meth:`batch` in two C calls (locate, assemble) and little else: the hot path of ds.batch
        and the Loader. None when it does not apply (empty batch, dtype, a bad segment: the general
        path then gives the result or the detailed error; rows over ``max_length``: truncation)."""
        idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
        b = idx.size
        toks, ok = (self._native_args or self._native_shards())[3:]
        if not (b and ok):
            return None
        got = self._locate_native(nat, idx)
        if got is None or (max_length is not None and got[1] > max_length):
            return None
        coords, longest = got
        n = -(-longest // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else longest
        seqs = np.empty((2, b, n), dtype=np.int64)
        masks = np.empty((3, b, n), dtype=np.bool_)
        nat.assemble(toks, None if len(toks) == 1 else coords[1], coords[2], coords[5], coords[3:5], coords[6:8], n,
                     self.manifest.pad_id, seqs, masks)
        cols = {c: np.asarray(self.column(c)[coords[0]]) for c in columns} if columns else None
        return _triplets().wrap(seqs, masks, coords[0], coords[5], coords[6:8], cols)

    def segments(self, indices: Sequence[int] | np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Coordinates of pairs ``indices``: (tokens array per pair, starts (3, B), lengths (3, B))."""
        t = self.take(indices)
        return t.tokens, t.starts, t.lengths

    def batch(self, indices: Sequence[int] | np.ndarray, *, pad_to_multiple_of: int | None = None,
              columns: Sequence[str] = ()) -> "Triplets":
        """Assemble pairs ``indices`` into a :class:`~pairpack.Triplets` (torch tensors).

        Args:
            indices: pair indices (any order, repeats allowed).
            pad_to_multiple_of: round the padded length ``L`` up to a multiple of this.
            columns: per-pair columns to carry as ``(B,)`` tensors in ``Triplets.columns``.
        """
        if _accel.native is not None:
            got = self._batch_native(_accel.native, indices, pad_to_multiple_of, columns)
            if got is not None:
                return got
        t = self.take(indices, columns)
        return _triplets().assemble(t.tokens, t.starts[0], t.lengths[0], t.starts[1:], t.lengths[1:],
                                    pad_id=self.pad_id, pad_to_multiple_of=pad_to_multiple_of, indices=t.indices,
                                    columns=t.columns, shards=t.shards, shard_of=t.shard_of, longest=t.longest)

    # --- text -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer recorded in the manifest, loaded for decoding, or None when unknown."""
        if self._tokenizer is None and self.manifest.tokenizer is not None:
            from .tokenization import tokenizer_from_manifest

            self._tokenizer = tokenizer_from_manifest(self.manifest.tokenizer, self.path)
        return self._tokenizer

    def decode(self, ids: np.ndarray) -> str | None:
        """Text of ``ids`` with the dataset's tokenizer, or None when it is not available."""
        tok = self.tokenizer
        return None if tok is None else tok.decode(ids)

    # --- verification --------------------------------------------------------------------------
    def verify(self, *, checksums: bool = True) -> list[str]:
        """Check every checksum and invariant (FORMAT.md §8 R12-R17); returns the problems found.

        An empty list means the dataset is sound. Runs near disk speed: one hashing pass per
        file plus chunked vectorised passes over the index arrays and tokens. The same checks as
        :func:`verify_dataset` on this dataset's path (files are re-read, not trusted from open).
        """
        self._live()  # a closed dataset says so
        return verify_dataset(self.path, checksums=checksums)


_TRIPLETS: Any = None


def _triplets() -> Any:
    """pairpack.triplets, imported on first use (it needs torch; ``import pairpack`` does not)."""
    global _TRIPLETS
    if _TRIPLETS is None:
        from . import triplets

        _TRIPLETS = triplets
    return _TRIPLETS


def _open_shard(root: Path, m: fmt.Manifest, i: int) -> _Shard:
    """Map shard ``i``'s files after the open-time checks (FORMAT.md §8 R3-R8)."""
    s = m.shards[i]
    where = f"shards[{i}]"
    f = {k: fmt.resolve_file(root, s.files[k].path) for k in fmt.INDEX_FILES}
    tokens = fmt.open_array(f["tokens"], f"{where}.tokens", dtype=fmt.TOKEN_DTYPES[m.token_dtype],
                            shape=(s.num_tokens,), expected_bytes=s.files["tokens"].bytes)
    starts = fmt.open_array(f["starts"], f"{where}.starts", dtype=fmt.INDEX_DTYPE,
                            shape=(3, s.num_pairs), expected_bytes=s.files["starts"].bytes)
    lengths = fmt.open_array(f["lengths"], f"{where}.lengths", dtype=fmt.INDEX_DTYPE,
                             shape=(3, s.num_pairs), expected_bytes=s.files["lengths"].bytes)
    cols = {}
    for c in m.columns:
        e = s.columns[c.name]
        cols[c.name] = fmt.open_array(fmt.resolve_file(root, e.path), f"{where}.columns.{c.name}",
                                      dtype=fmt.COLUMN_DTYPES[c.dtype], shape=(s.num_pairs,),
                                      expected_bytes=e.bytes)
    return _Shard(s, tokens, starts, lengths, cols, root / s.name)


def _tokens_max_visitor(sh: _Shard, path: Path) -> tuple[Any, list[int]]:
    """A file_checksum visitor computing the largest token id in the hashing pass (one read)."""
    dt = sh.tokens.dtype
    data_start = os.stat(path).st_size - int(sh.tokens.shape[0]) * dt.itemsize  # data ends the file (R8)
    hi = [-1]

    def visit(chunk: memoryview, off: int) -> None:
        # chunk offsets are multiples of 16 MiB and data_start of 64: items stay aligned
        part = chunk[max(data_start - off, 0):]
        part = part[:len(part) - len(part) % dt.itemsize]
        if len(part):
            hi[0] = max(hi[0], int(np.frombuffer(part, dtype=dt).max()))

    return visit, hi


def _checksum_problems(root: Path, info: fmt.ShardInfo, i: int, sh: _Shard | None = None,
                       on_file: Callable[[int], None] | None = None) -> tuple[list[str], int | None]:
    """xxh3-128 of every file of a shard against the manifest (FORMAT.md §8 R12).

    With the mapped shard ``sh`` it also returns the largest token id, read in the same pass.
    ``on_file(nbytes)`` is called after each file (for progress).
    """
    out: list[str] = []
    hi: list[int] | None = None
    entries = {**info.files, **{f"columns.{k}": v for k, v in info.columns.items()}}
    for key, e in entries.items():
        fld = f"shards[{i}].{key}"
        try:
            p = fmt.resolve_file(root, e.path)
            fmt.regular_file_size(p, fld)  # never open a FIFO or device (R4)
            visit = None
            if key == "tokens" and sh is not None:
                visit, hi = _tokens_max_visitor(sh, p)
            got = fmt.file_checksum(p, visit)
        except FormatError as err:
            out.append(str(err))
            continue
        except OSError as err:
            out.append(str(FormatError(f"cannot read file ({err.strerror or err})", path=root / e.path,
                                       field=fld, section="§8 R4")))
            continue
        finally:
            if on_file is not None:
                on_file(e.bytes)
        if got != e.checksum:
            out.append(str(ChecksumError("checksum mismatch", path=p, field=fld, expected=e.checksum,
                                         actual=got, section="§8 R12")))
    return out, (hi[0] if hi is not None and hi[0] >= 0 else None)


def verify_dataset(path: str | os.PathLike, *, checksums: bool = True,
                   on_file: Callable[[int], None] | None = None) -> list[str]:
    """Every problem of the dataset at ``path`` as one message each; ``[]`` when it is sound.

    Unlike ``open(path).verify()`` this never raises for a damaged dataset: a manifest that
    cannot be read is one problem; a shard that cannot be opened is reported and the other
    shards (and that shard's checksums) are still checked (FORMAT.md §8). ``on_file(nbytes)`` is
    called after each shard file is hashed (for a progress bar).
    """
    root = Path(path)
    try:
        m = fmt.read_manifest(root)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    for i, s in enumerate(m.shards):
        try:
            sh: _Shard | None = _open_shard(root, m, i)
        except FormatError as e:
            problems.append(str(e))
            sh = None
        hi = None
        if checksums:
            more, hi = _checksum_problems(root, s, i, sh, on_file)
            problems += [p for p in more if p not in problems]
        if sh is not None:
            problems += _verify_shard(sh, i, m.vocab_size, tokens_max=hi)
    if checksums:
        problems += _tokenizer_file_problems(root, m)
    return problems


def _tokenizer_file_problems(root: Path, m: fmt.Manifest) -> list[str]:
    """The dataset's copy of its tokenizer file (manifest tokenizer.file: path, bytes, xxh3_128),
    when it has one, against its recorded size and checksum (FORMAT.md §5.2)."""
    e = (m.tokenizer or {}).get("file")
    if e is None:
        return []
    fld = "tokenizer.file"
    try:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise FormatError("must be an object with path, bytes and xxh3_128", path=root / fmt.MANIFEST_NAME,
                              field=fld, section="§5.2")
        p = fmt.resolve_file(root, fmt.check_relpath(e["path"], root / fmt.MANIFEST_NAME, fld + ".path"))
        size = fmt.regular_file_size(p, fld)  # never open a FIFO or device (R4)
        if size != e.get("bytes"):
            raise ChecksumError("file size differs from the manifest", path=p, field=fld + ".bytes",
                                expected=e.get("bytes"), actual=size, section="§5.2")
        got = fmt.file_checksum(p)
        if got != e.get(fmt.CHECKSUM_KEY):
            raise ChecksumError("checksum mismatch", path=p, field=fld, expected=e.get(fmt.CHECKSUM_KEY),
                                actual=got, section="§5.2")
    except FormatError as err:
        return [str(err)]
    except OSError as err:
        return [str(FormatError(f"cannot read file ({err.strerror or err})", path=root / str(e.get("path")),
                                field=fld, section="§5.2"))]
    return []


def _check_segments(shard: _Shard, starts: np.ndarray, lengths: np.ndarray, local: Any) -> None:
    """Raise FormatError unless every segment lies inside the shard's tokens (FORMAT.md §8 R13)."""
    t = shard.tokens.shape[0]
    bad = (starts < 0) | (lengths < 1) | (starts > t) | (lengths > t - starts)
    if bad.any():
        seg, col = np.argwhere(bad)[0]
        j = int(np.asarray(local).reshape(-1)[col])
        raise FormatError(
            f"pair {j}: {fmt.SEGMENTS[seg]} segment [start {int(starts[seg, col])}, length "
            f"{int(lengths[seg, col])}) is not inside tokens [0, {t}) or is empty",
            path=shard.dir, field=f"starts/lengths[{seg}, {j}]", section="§8 R13")


_CHUNK = 1 << 22  # pairs per vectorised step in verify: bounded temporaries (~100 MiB)


def _verify_shard(sh: _Shard, i: int, vocab_size: int, *, tokens_max: int | None = None) -> list[str]:
    """Invariants of one mapped shard (FORMAT.md §8 R13-R17), chunked over pairs.

    ``tokens_max``: the largest token id when the hashing pass already computed it.
    """
    out: list[str] = []
    t = sh.tokens.shape[0]
    where = sh.dir
    n = sh.info.num_pairs
    r13 = r10 = r11 = 0
    first13 = first10 = first11 = ""
    prev_end = 0  # where the previous pair's rejected segment ends (R17)
    new_starts: list[np.ndarray] = []  # starts and lengths of first-stored prompts (R17)
    new_lens: list[np.ndarray] = []
    for a in range(0, n, _CHUNK):
        st = np.asarray(sh.starts[:, a:a + _CHUNK])
        ln = np.asarray(sh.lengths[:, a:a + _CHUNK])
        # R13: inside the tokens and non-empty; int64 cannot overflow: t - st only where st <= t
        bad = (st < 0) | (ln < 1) | (st > t) | (ln > t - np.minimum(st, t))
        if bad.any():
            seg, col = np.argwhere(bad)[0]
            if not r13:
                first13 = (f"pair {a + int(col)} {fmt.SEGMENTS[seg]} [start {int(st[seg, col])}, "
                           f"length {int(ln[seg, col])})")
            r13 += int(bad.sum())
        # R17: pair order, no gaps: [new prompt] chosen rejected, each pair after the previous one
        ps, cs, rs = st
        pl, cl, rl = ln
        prev = np.empty_like(cs)
        if len(cs):
            prev[0] = prev_end
            np.add(rs[:-1], rl[:-1], out=prev[1:])
            prev_end = int(rs[-1]) + int(rl[-1])
        new = ps == prev
        ok10 = (cs + cl == rs) & np.where(new, cs == ps + pl, (cs == prev) & (ps < prev))
        if not ok10.all():
            j = int(np.flatnonzero(~ok10)[0])
            if not r10:
                first10 = (f"pair {a + j}: prompt {int(ps[j])}+{int(pl[j])}, chosen {int(cs[j])}+"
                           f"{int(cl[j])}, rejected {int(rs[j])}+{int(rl[j])}, previous pair ends at "
                           f"{int(prev[j])}")
            r10 += int((~ok10).sum())
        new_starts.append(ps[new])
        new_lens.append(pl[new])
        reused = np.flatnonzero(~new)
        if reused.size:
            # R17: a reused prompt start is that of an earlier first-stored prompt, same length
            known_s = np.concatenate(new_starts)
            known_l = np.concatenate(new_lens)
            k = np.searchsorted(known_s, ps[reused])
            kc = np.minimum(k, max(len(known_s) - 1, 0))
            ok11 = ((k < len(known_s)) & (known_s[kc] == ps[reused]) & (known_l[kc] == pl[reused])
                    if len(known_s) else np.zeros(reused.size, dtype=bool))
            if not ok11.all():
                j = int(reused[np.flatnonzero(~ok11)[0]])
                if not r11:
                    first11 = (f"pair {a + j}: prompt [start {int(ps[j])}, length {int(pl[j])}) is not "
                               f"a prompt stored earlier in this shard")
                r11 += int((~ok11).sum())
    if r13:
        out.append(str(FormatError(f"{r13} segment(s) outside tokens [0, {t}) or empty; first: {first13}",
                                   path=where, field=f"shards[{i}].starts/lengths", section="§8 R13")))
    if r10 or prev_end != t:
        detail = (f"{r10} pair(s) out of order; first: {first10}" if r10 else
                  f"the last segment ends at {prev_end}, tokens hold {t}")
        out.append(str(FormatError(f"segments are not stored in pair order without gaps ({detail})",
                                   path=where, field=f"shards[{i}].starts/lengths", section="§8 R17")))
    if r11:
        out.append(str(FormatError(f"{r11} reused prompt(s) do not match a stored prompt; first: {first11}",
                                   path=where, field=f"shards[{i}].starts[0]", section="§8 R17")))
    if n:
        # distinct prompt starts: the first-stored prompts when R17 holds (no sort needed)
        distinct = (sum(len(x) for x in new_starts) if not (r10 or r11)
                    else len(np.unique(sh.starts[0])))
        if distinct != sh.info.num_prompts:
            out.append(str(FormatError("num_prompts differs from the distinct prompt starts", path=where,
                                       field=f"shards[{i}].num_prompts", expected=int(distinct),
                                       actual=sh.info.num_prompts, section="§8 R15")))
    hi = -1 if tokens_max is None else tokens_max
    for a in range(0, t if tokens_max is None else 0, 1 << 24):
        hi = max(hi, int(sh.tokens[a:a + (1 << 24)].max()))
    if hi >= vocab_size:
        out.append(str(FormatError("token id >= vocab_size", path=where / fmt.TOKENS_FILE,
                                   field=f"shards[{i}].tokens", expected=f"< {vocab_size}", actual=hi,
                                   section="§8 R14")))
    for name, col in sh.columns.items():
        if col.dtype.kind == "f" and n:
            finite = np.isfinite(col)
            if not finite.all():
                j = int(np.flatnonzero(~finite)[0])
                out.append(str(FormatError(f"{int((~finite).sum())} non-finite value(s); first at pair {j}: "
                                           f"{col[j]}", path=where, field=f"shards[{i}].columns.{name}",
                                           section="§8 R16")))
    return out


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open the pairpack dataset at ``path`` in O(1) (see :class:`Dataset`)."""
    return Dataset(path)


# re-exported for type hints without importing torch at module import time
def __getattr__(name: str) -> Any:
    if name == "Triplets":
        from .triplets import Triplets

        return Triplets
    raise AttributeError(name)
