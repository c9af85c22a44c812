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
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from . import format as fmt
from .errors import ChecksumError, FormatError

__all__ = ["Pair", "Dataset", "open_dataset"]


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
        self._shards: list[_Shard] = []
        for i, s in enumerate(m.shards):
            where = f"shards[{i}]"
            f = {k: fmt.resolve_file(self.path, s.files[k].path) for k in fmt.INDEX_FILES}
            tokens = fmt.open_array(f["tokens"], f"{where}.tokens", dtype=self.token_dtype,
                                    shape=(s.num_tokens,), expected_bytes=s.files["tokens"].bytes)
            starts = fmt.open_array(f["starts"], f"{where}.starts", dtype=fmt.INDEX_DTYPE,
                                    shape=(3, s.num_pairs), expected_bytes=s.files["starts"].bytes)
            lengths = fmt.open_array(f["lengths"], f"{where}.lengths", dtype=fmt.INDEX_DTYPE,
                                     shape=(3, s.num_pairs), expected_bytes=s.files["lengths"].bytes)
            cols = {}
            for c in m.columns:
                e = s.columns[c.name]
                cols[c.name] = fmt.open_array(fmt.resolve_file(self.path, e.path), f"{where}.columns.{c.name}",
                                              dtype=fmt.COLUMN_DTYPES[c.dtype], shape=(s.num_pairs,),
                                              expected_bytes=e.bytes)
            self._shards.append(_Shard(s, tokens, starts, lengths, cols, self.path / s.name))
        # bounds[k] = index of the first pair of shard k; bounds[-1] = len(ds)
        self._bounds = np.cumsum([0] + [s.num_pairs for s in m.shards], dtype=np.int64)
        self._lengths: np.ndarray | None = None
        self._tokenizer: Any = None

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
        self._lengths = None

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
    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(3, N)``: prompt, chosen and rejected lengths of every pair (tokens).

        A zero-copy view for a one-shard dataset; concatenated once (and cached) otherwise.
        """
        if self._lengths is None:
            shards = self._live()
            if len(shards) == 1:
                self._lengths = shards[0].lengths
            else:
                self._lengths = (np.concatenate([s.lengths for s in shards], axis=1) if shards
                                 else np.zeros((3, 0), dtype=np.int64))
        return self._lengths

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
        """Per-pair column ``name`` as a ``(N,)`` array (a view for one shard)."""
        if name not in self.column_names:
            raise KeyError(f"{self.path}: no column {name!r}; columns: {self.column_names}")
        parts = [s.columns[name] for s in self._live()]
        if len(parts) == 1:
            return parts[0]
        dt = fmt.COLUMN_DTYPES[next(c.dtype for c in self.manifest.columns if c.name == name)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dt)

    # --- batches -------------------------------------------------------------------------------
    def segments(self, indices: Sequence[int] | np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Coordinates of pairs ``indices``: (tokens array per pair, starts (3, B), lengths (3, B)).

        Bounds are checked vectorised; used by :meth:`batch` and by the loader's truncation.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"pair index {int(bad)} out of range for {n} pairs")
        idx = np.where(idx < 0, idx + n, idx)
        shards = self._live()
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
        return tokens, starts, lengths

    def batch(self, indices: Sequence[int] | np.ndarray, *, pad_to_multiple_of: int | None = None,
              columns: Sequence[str] = ()) -> "Triplets":
        """Assemble pairs ``indices`` into a :class:`~pairpack.Triplets` (torch tensors).

        Args:
            indices: pair indices (any order, repeats allowed).
            pad_to_multiple_of: round the padded length ``L`` up to a multiple of this.
            columns: per-pair columns to carry as ``(B,)`` tensors in ``Triplets.columns``.
        """
        from .triplets import assemble

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        tokens, st, ln = self.segments(idx)
        idx = np.where(idx < 0, idx + len(self), idx)
        cols = {c: np.asarray(self.column(c)[idx]) for c in columns}
        return assemble(tokens, st[0], ln[0], st[1:], ln[1:], pad_id=self.pad_id,
                        pad_to_multiple_of=pad_to_multiple_of, indices=idx, columns=cols)

    # --- text -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer recorded in the manifest, loaded for decoding, or None when unknown."""
        if self._tokenizer is None and self.manifest.tokenizer is not None:
            from .tokenization import tokenizer_from_manifest

            self._tokenizer = tokenizer_from_manifest(self.manifest.tokenizer)
        return self._tokenizer

    def decode(self, ids: np.ndarray) -> str | None:
        """Text of ``ids`` with the dataset's tokenizer, or None when it is not available."""
        tok = self.tokenizer
        return None if tok is None else tok.decode(ids)

    # --- verification --------------------------------------------------------------------------
    def verify(self, *, checksums: bool = True) -> list[str]:
        """Check every checksum and invariant (FORMAT.md §8 R12-R17); returns the problems found.

        An empty list means the dataset is sound. Runs near disk speed: one hashing pass per
        file plus vectorised passes over the index arrays and tokens.
        """
        problems: list[str] = []
        m = self.manifest
        for i, sh in enumerate(self._live()):
            entries = dict(sh.info.files)
            entries.update({f"columns.{k}": v for k, v in sh.info.columns.items()})
            if checksums:
                for key, e in entries.items():
                    p = self.path / e.path
                    got = fmt.file_checksum(p)
                    if got != e.checksum:
                        problems.append(str(ChecksumError("checksum mismatch", path=p, field=f"shards[{i}].{key}",
                                                          expected=e.checksum, actual=got, section="§8 R12")))
            problems += _verify_shard(sh, i, m.vocab_size)
        return problems


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


def _verify_shard(sh: _Shard, i: int, vocab_size: int) -> list[str]:
    out: list[str] = []
    t = sh.tokens.shape[0]
    where = sh.dir
    chunk = 1 << 22
    n = sh.info.num_pairs
    for a in range(0, n, chunk):
        st, ln = sh.starts[:, a:a + chunk], sh.lengths[:, a:a + chunk]
        bad = (st < 0) | (ln < 1) | (st > t) | (ln > t - st)
        if bad.any():
            seg, col = np.argwhere(bad)[0]
            out.append(str(FormatError(
                f"{int(bad.sum())} segment(s) outside tokens or empty; first: pair {a + int(col)} "
                f"{fmt.SEGMENTS[seg]} [start {int(st[seg, col])}, length {int(ln[seg, col])}) vs {t} tokens",
                path=where, field="starts/lengths", section="§8 R13")))
            break
    if n:
        prompts = np.unique(sh.starts[0])
        if len(prompts) != sh.info.num_prompts:
            out.append(str(FormatError("num_prompts differs from the distinct prompt starts", path=where,
                                       field=f"shards[{i}].num_prompts", expected=int(len(prompts)),
                                       actual=sh.info.num_prompts, section="§8 R15")))
    hi = -1
    for a in range(0, t, 1 << 24):
        hi = max(hi, int(sh.tokens[a:a + (1 << 24)].max()))
    if hi >= vocab_size:
        out.append(str(FormatError("token id >= vocab_size", path=where / fmt.TOKENS_FILE,
                                   field="tokens", expected=f"< {vocab_size}", actual=hi, section="§8 R14")))
    for name, col in sh.columns.items():
        if col.dtype.kind == "f" and n and not np.isfinite(col).all():
            out.append(str(FormatError("non-finite values", path=where, field=f"columns.{name}",
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
