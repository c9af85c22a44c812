"""Lazy, zero-copy reader of pairpack datasets.
Opening reads the manifest and memory-maps each array after checking its header and size
(FORMAT.md §8): O(#shards) work, nothing proportional to the number of pairs or tokens. Every
read checks the coordinates it uses against the file it reads, so no access can leave a file
even when the index arrays are hostile; :meth:`Dataset.verify` checks everything up front."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .. import _accel
from .. import format as fmt
from ..errors import ArgumentError, ArgumentTypeError, ColumnNotFoundError, FormatError, PairIndexError, StateError
from ..format.spec import round_up
from .shard import _check_segments, _open_shard, _Shard
from .verify import verify_dataset

if TYPE_CHECKING:  # torch is imported only when a batch is assembled
    from ..batch.triplets import Triplets

__all__ = ["Pair", "Dataset", "open_dataset", "pair_indices"]


class Pair(NamedTuple):
    """One preference pair: three 1-D token views (uint16 or uint32) into the memory map."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray





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
        try:
            self.path = Path(path)
        except TypeError:
            raise ArgumentTypeError(f"a dataset path must be a str or os.PathLike, got {type(path).__name__}") from None
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
            raise StateError(f"{self.path}: dataset is closed")
        return self._shards

    @property
    def pad_id(self) -> int:
        """The pad id recorded in the manifest (padding value of batches; masks never read it)."""
        return self.manifest.pad_id

    @property
    def vocab_size(self) -> int:
        """The vocabulary size recorded in the manifest: every token id is below it."""
        return self.manifest.vocab_size

    @property
    def fingerprint(self) -> str:
        """Identity of the pairs (FORMAT.md §7.3): equal for byte-identical token/index files."""
        return self.manifest.fingerprint()

    @property
    def column_names(self) -> list[str]:
        """Names of the per-pair columns (scores, cached reference log-probs), in manifest order."""
        return [c.name for c in self.manifest.columns]

    def _locate(self, index: int) -> tuple[_Shard, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise PairIndexError(f"pair index {index} out of range for {n} pairs")
        k = int(np.searchsorted(self._bounds, index, side="right")) - 1
        return self._live()[k], index - int(self._bounds[k])

    def __getitem__(self, index: int) -> Pair:
        """Pair ``index`` as three zero-copy views. Raises FormatError if its index entry points
        outside the tokens file."""
        shard, j = self._locate(_pair_index(index))
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
        """int64 ``(N,)``: every pair's prompt length in tokens (a row of :attr:`lengths`)."""
        return self.lengths[fmt.PROMPT]

    @property
    def chosen_lengths(self) -> np.ndarray:
        """int64 ``(N,)``: every pair's chosen length in tokens (a row of :attr:`lengths`)."""
        return self.lengths[fmt.CHOSEN]

    @property
    def rejected_lengths(self) -> np.ndarray:
        """int64 ``(N,)``: every pair's rejected length in tokens (a row of :attr:`lengths`)."""
        return self.lengths[fmt.REJECTED]

    def column(self, name: str) -> np.ndarray:
        """Per-pair column ``name`` as a ``(N,)`` array (a view for one shard; joined once otherwise)."""
        if name not in self.column_names:
            raise ColumnNotFoundError(self.path, name, self.column_names)
        dt = fmt.COLUMN_DTYPES[next(c.dtype for c in self.manifest.columns if c.name == name)]
        return self._join(f"column:{name}", lambda s: s.columns[name], np.zeros(0, dtype=dt))

    # --- batches -------------------------------------------------------------------------------
    def take(self, indices: Sequence[int] | np.ndarray, columns: Sequence[str] = ()) -> Taken:
        """Everything a batch of pairs ``indices`` needs, nothing copied from the tokens yet.

        Indices may be negative (from the end) and repeat; they are range-checked and every
        segment is bounds-checked, vectorised (FORMAT.md §8 R13). Used by :meth:`batch` and by the
        loader's plans.
        """
        idx = pair_indices(indices)
        n = len(self)
        if _accel.native is not None and idx.size:
            got = self._take_native(_accel.native, idx, columns)
            if got is not None:
                return got
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise PairIndexError(f"pair index {int(bad)} out of range for {n} pairs")
        idx = np.where(idx < 0, idx + n, idx)
        cols = self._columns_at(columns, idx)
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
        longest row; raises PairIndexError for an index out of range, None for a bad segment."""
        st, ln, ntok = (self._native_args or self._native_shards())[:3]
        coords = np.empty((8, idx.size), dtype=np.int64)
        try:
            return coords, nat.take(idx, self.manifest.num_pairs, self._bounds, st, ln, ntok, coords)
        except IndexError as e:
            raise PairIndexError(str(e)) from None
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
        cols = self._columns_at(columns, idx)
        if len(toks) == 1:
            return Taken(idx, [toks[0]] * idx.size, coords[2:5], coords[5:8], cols, toks, None, longest)
        shard_of = coords[1]
        return Taken(idx, list(map(toks.__getitem__, shard_of.tolist())), coords[2:5], coords[5:8], cols, toks,
                     shard_of, longest)

    def _located(self, nat: Any, indices: Sequence[int] | np.ndarray, max_length: int | None
                 ) -> tuple[tuple[np.ndarray, ...], np.ndarray, int] | None:
        """(token arrays, coords ``(8, B)``, longest row) of pairs ``indices`` by the C ``take``,
        when the batch kernels apply; None when they do not (empty batch, dtype or pad_id, a bad
        segment: the general path then gives the result or the detailed error; a row over
        ``max_length``: truncation). The first of the two C calls of every layout's hot path."""
        idx = np.ascontiguousarray(pair_indices(indices))
        toks, ok = (self._native_args or self._native_shards())[3:]
        if not (idx.size and ok):
            return None
        got = self._locate_native(nat, idx)
        if got is None or (max_length is not None and got[1] > max_length):
            return None
        return toks, got[0], got[1]

    def _columns_at(self, columns: Sequence[str], idx: np.ndarray) -> dict[str, np.ndarray]:
        """The values of ``columns`` at pair indices ``idx`` (non-negative)."""
        return {c: np.asarray(self.column(c)[idx]) for c in columns}

    def _batch_native(self, nat: Any, indices: Sequence[int] | np.ndarray, pad_to_multiple_of: int | None,
                      columns: Sequence[str], max_length: int | None = None) -> "Triplets | None":
        """:meth:`batch` in two C calls (locate, assemble) and little else: the hot path of ds.batch
        and the Loader. None where :meth:`_located` does not apply."""
        got = self._located(nat, indices, max_length)
        if got is None:
            return None
        toks, coords, longest = got
        b = coords.shape[1]
        n = round_up(longest, pad_to_multiple_of)
        seqs = np.empty((2, b, n), dtype=np.int64)
        masks = np.empty((3, b, n), dtype=np.bool_)
        nat.assemble(toks, None if len(toks) == 1 else coords[1], coords[2], coords[5], coords[3:5], coords[6:8], n,
                     self.manifest.pad_id, seqs, masks)
        cols = self._columns_at(columns, coords[0]) if columns else None
        return _triplets().wrap(seqs, masks, coords[0], coords[5], coords[6:8], cols)

    def segments(self, indices: Sequence[int] | np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Coordinates of pairs ``indices``: (tokens array per pair, starts (3, B), lengths (3, B))."""
        t = self.take(indices)
        return t.tokens, t.starts, t.lengths

    def batch(self, indices: Sequence[int] | np.ndarray, *, pad_to_multiple_of: int | None = None,
              columns: Sequence[str] = (), max_length: int | None = None, truncation: Any = None,
              min_completion_tokens: int = 1, layout: str = "padded", max_row_tokens: int | None = None,
              options: Any = None) -> Any:
        """Assemble pairs ``indices`` into a batch of torch tensors: :class:`~pairpack.Triplets`
        (``layout="padded"``) or :class:`~pairpack.batch.layouts.PackedBatch`.

        Args:
            indices: pair indices (any order, repeats allowed).
            pad_to_multiple_of: round the padded length ``L`` (row length ``T``) up to a multiple of this.
            columns: per-pair columns to carry as ``(B,)`` tensors in the batch's ``columns``.
            max_length: truncate pairs so that ``P + C`` and ``P + R`` fit, as the Loader does.
            truncation: ``"keep_end"`` or ``"keep_start"``, or a
                :class:`~pairpack.batch.options.Truncation` in place of the three truncation arguments.
            min_completion_tokens: completions are cut no shorter than this before the prompt.
            layout: ``"padded"``, ``"packed"`` or ``"prefix_shared"``.
            max_row_tokens: the longest packed row (None: one row; 0: one pair per row).
            options: a :class:`~pairpack.batch.options.PlanOptions` instead of ``pad_to_multiple_of``,
                ``layout`` and ``max_row_tokens``.

        Same call as :func:`pairpack.batch.plan.batch_of` (this method forwards to it).
        """
        plan = _batching()
        if (options is None and truncation is None and max_length is None and layout == "padded"
                and _accel.native is not None):  # the hot path: no option object to build
            got = self._batch_native(_accel.native, indices, pad_to_multiple_of, columns)
            if got is not None:
                return got
        opts, trunc = plan.options_from(options, truncation, pad_to_multiple_of=pad_to_multiple_of, layout=layout,
                                        max_row_tokens=max_row_tokens, max_length=max_length,
                                        min_completion_tokens=min_completion_tokens)
        return plan.batch_of(self, indices, options=opts, truncation=trunc, columns=columns)

    # --- splits (FORMAT.md §4.5, §5.6) ------------------------------------------------------------
    @property
    def splits(self) -> dict[str, fmt.SplitInfo]:
        """The named splits recorded in the manifest (``pairpack split``), name -> :class:`~pairpack.format.SplitInfo`."""
        return {s.name: s for s in self.manifest.splits}

    def split(self, name: str) -> np.ndarray:
        """The pair indices of split ``name``: int64 ``(k,)``, strictly increasing, in ``[0, len(ds))``.

        Memory-mapped after the header and size checks (§8 R5-R8); the order and range are checked
        on first use (§8 R19), so hostile indices raise :class:`~pairpack.FormatError` instead of
        reaching a batch. Raises :class:`~pairpack.errors.ArgumentError` for an unknown name.
        """
        info = self.splits.get(name)
        if info is None:
            have = ", ".join(self.splits) or "none; make them with pairpack split"
            raise ArgumentError(f"{self.path}: no split named {name!r} (splits: {have})")
        key = f"split:{name}"
        if key not in self._joined:
            p = fmt.resolve_file(self.path, info.file.path)
            fld = f"splits.{name}"
            idx = fmt.open_array(p, fld, dtype=fmt.SPLIT_DTYPE, shape=(info.num_pairs,),
                                 expected_bytes=info.file.bytes)
            if idx.size and (idx[0] < 0 or idx[-1] >= len(self) or (idx.size > 1 and (np.diff(idx) <= 0).any())):
                raise FormatError(f"split indices must be strictly increasing pair indices in [0, {len(self)})",
                                  path=p, field=fld, section="§8 R19")
            self._joined[key] = idx
        return self._joined[key]

    # --- text -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer recorded in the manifest, loaded for decoding, or None when unknown."""
        if self._tokenizer is None and self.manifest.tokenizer is not None:
            # loaded on use: opening and reading never import the tokenizer module
            from ..tokenization import tokenizer_from_manifest

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


_BATCHING: Any = None


def _batching() -> Any:
    """pairpack.batch.plan, imported on first use (batches need torch; ``import pairpack`` does not)."""
    global _BATCHING
    if _BATCHING is None:
        from ..batch import plan

        _BATCHING = plan
    return _BATCHING


def _triplets() -> Any:
    """pairpack.batch.triplets (wraps the C kernel's output), imported on first use."""
    from ..batch import triplets

    return triplets


def pair_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``indices`` as int64 ``(B,)`` (any shape is flattened); :class:`ArgumentError` when they are
    not integers."""
    try:
        return np.asarray(indices, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise ArgumentError(f"indices must be pair indices (integers), got {str(indices)[:80]}") from None


def _pair_index(index: Any) -> int:
    """``int(index)``, a :class:`PairpackError` when it is not a pair index: an
    :class:`ArgumentError` (a ``ValueError``, as ``int()`` raised) for a string such as ``"x"`` or an
    infinite float, an
    :class:`ArgumentTypeError` (a ``TypeError``) for ``None``, a slice or a list."""
    try:
        return int(index)
    except (ValueError, OverflowError):
        raise ArgumentError(f"a pair index must be an integer, got {index!r:.80}") from None
    except TypeError:
        raise ArgumentTypeError(f"a pair index must be an integer, got {type(index).__name__}") from None


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open the pairpack dataset at ``path`` in O(1) (see :class:`Dataset`)."""
    return Dataset(path)
