"""Hypothesis strategies for pairpack pairs and datasets: the one place tests get them from.

Vocabulary used below:

* a *segment* is a ``list[int]`` of token ids, never empty (FORMAT.md §9: empty segments are
  refused);
* a *pair* is ``(prompt, chosen, rejected)``, three segments;
* a :class:`DatasetSpec` is everything needed to write one dataset with :class:`pairpack.Writer`
  (pairs, vocab size, pad id, shard size, de-duplication window, per-pair columns) together with
  what a correct writer must produce from it (:meth:`DatasetSpec.expected_dtype`, ...).

Public strategies (all bounded, so examples stay small and fast):

* :func:`token_ids` - one id in ``[0, max_id]``, biased towards the uint16 boundary
  (65535 / 65536) and the ends of the range;
* :func:`segments` - one segment; :func:`long_segments` - one segment of 200..``max_len`` ids;
* :func:`max_ids` - the largest id a pair list may use, around the uint16 and uint32 limits;
* :func:`pair_lists` - ``list[Pair]`` with prompts shared between pairs (adjacent runs and
  interleaved), equal-length-but-different prompts, 1-token and long segments, empty lists;
* :func:`vocab_sizes` - ``None`` or a vocabulary size ``>= max_id + 1`` near the uint16 limit;
* :func:`datasets_spec` - a whole :class:`DatasetSpec`, optionally with a tiny ``shard_bytes``
  (several shards), small ``dedup_window`` values (0 disables de-duplication), per-pair
  columns, a ``pad_id`` that is also a real token id, and "late widening" (every id fits uint16
  until the last pair, which has an id >= 65536);
* :func:`texts`, :func:`text_pair_lists` - string records for text builds (valid Unicode only).

Helpers: :func:`expected_dedup` (reference model of prompt de-duplication, §7.2) and
:func:`scratch_dir` (a temporary directory on tmpfs, for one example's dataset).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from hypothesis import strategies as st

import pairpack

Segment = list[int]
Pair = tuple[Segment, Segment, Segment]

UINT16_LIMIT = 1 << 16  # ids < 65536 fit uint16 (FORMAT.md §4.1)
UINT32_MAX_ID = (1 << 32) - 1  # the largest id the format can hold (FORMAT.md §5.1)
BOUNDARY_IDS = (0, 1, 255, 256, 65534, 65535, 65536, 65537, UINT32_MAX_ID)
DEFAULT_SHARD_BYTES = 1 << 30  # Writer's default: one shard for every generated dataset
DEFAULT_DEDUP_WINDOW = 1 << 16  # Writer's default

# whitelisted per-pair column dtypes (FORMAT.md §4.4) -> a value strategy whose values survive the
# cast to that dtype exactly, and are finite (R16)
COLUMN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "float32": st.floats(width=32, allow_nan=False, allow_infinity=False),
    "float64": st.floats(allow_nan=False, allow_infinity=False),
    "int32": st.integers(-(1 << 31), (1 << 31) - 1),
    "int64": st.integers(-(1 << 63), (1 << 63) - 1),
}


# --- ids and segments -----------------------------------------------------------------------------
def token_ids(max_id: int) -> st.SearchStrategy[int]:
    """One token id in ``[0, max_id]``; boundary ids (0, 65535, 65536, ``max_id``...) are likely."""
    edges = sorted({i for i in BOUNDARY_IDS if i <= max_id} | {max_id})
    return st.one_of(st.sampled_from(edges), st.integers(0, max_id))


def segments(max_id: int, *, min_size: int = 1, max_size: int = 6) -> st.SearchStrategy[Segment]:
    """A segment of ``min_size..max_size`` ids (``min_size`` is clamped to >= 1)."""
    return st.lists(token_ids(max_id), min_size=max(1, min_size), max_size=max_size)


def long_segments(max_id: int, *, max_len: int = 3000) -> st.SearchStrategy[Segment]:
    """A segment of 200..``max_len`` ids, drawn with numpy from a seed (generating thousands of ids
    one by one through Hypothesis would dominate test time); the length still shrinks."""
    max_len = max(200, max_len)

    def make(args: tuple[int, int]) -> Segment:
        n, seed = args
        return np.random.default_rng(seed).integers(0, max_id, n, endpoint=True).tolist()

    return st.tuples(st.integers(200, max_len), st.integers(0, 2**32 - 1)).map(make)


def max_ids() -> st.SearchStrategy[int]:
    """The largest id a generated pair list may use: tiny, byte-sized, around 65535/65536, 2**32-1."""
    return st.sampled_from([1, 258, 1000, 65534, 65535, 65536, 65537, 100_000, UINT32_MAX_ID])


# --- pairs -----------------------------------------------------------------------------------------
@st.composite
def pair_lists(
    draw: st.DrawFn,
    *,
    min_pairs: int = 0,
    max_pairs: int = 12,
    max_id: int | None = None,
    allow_long: bool = True,
) -> list[Pair]:
    """A list of ``min_pairs..max_pairs`` pairs with ids in ``[0, max_id]``.

    Prompts come from a small pool so several pairs share a prompt; the layout is one of
    "random" (shared prompts interleaved with others), "adjacent" (pairs of one prompt next to
    each other) or "round_robin" (shared prompts strictly interleaved). With probability ~1/4 the
    pool holds prompts of one length that differ in content (de-duplication must not merge
    them). Segments are 1..6 ids (often exactly 1); with ``allow_long``, in about a quarter of
    the lists a segment may also be 200..1200 ids.
    """
    if max_id is None:
        max_id = draw(max_ids())
    n = draw(st.integers(min_pairs, max_pairs))
    if n == 0:
        return []
    seg = segments(max_id)
    if allow_long and draw(st.integers(0, 3)) == 0:  # a quarter of the lists may hold long segments
        seg = st.one_of(seg, seg, seg, st.lists(token_ids(max_id), min_size=1, max_size=1),
                        long_segments(max_id, max_len=1200))
    if draw(st.integers(0, 3)) == 0:  # equal lengths, different content
        length = draw(st.integers(1, 5))
        pool = draw(st.lists(st.lists(token_ids(max_id), min_size=length, max_size=length),
                             min_size=1, max_size=4))
    else:
        pool = draw(st.lists(seg, min_size=1, max_size=4))
    which = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    layout = draw(st.sampled_from(["random", "adjacent", "round_robin"]))
    if layout == "adjacent":
        which.sort()
    elif layout == "round_robin":
        which = [i % len(pool) for i in range(n)]
    return [(list(pool[w]), draw(seg), draw(seg)) for w in which]


def vocab_sizes(max_id: int) -> st.SearchStrategy[int | None]:
    """``None`` (the writer records ``max id + 1``) or a size ``>= max_id + 1``, biased to the
    uint16 limit (65535, 65536, 65537) where that is allowed."""
    lo = max_id + 1
    near = [v for v in (lo, 65535, 65536, 65537, lo + 1, 1 << 32) if lo <= v <= (1 << 32)]
    return st.one_of(st.none(), st.sampled_from(sorted(set(near))))


# --- whole datasets --------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    """Inputs of one :class:`pairpack.Writer` run and what the result must look like.

    Attributes:
        pairs: the pairs in write order.
        vocab_size: passed to the writer (None: the writer infers ``max id + 1``).
        pad_id: passed to the writer; may equal a real token id on purpose.
        shard_bytes: passed to the writer; tiny values force several shards.
        dedup_window: passed to the writer; 0 disables prompt de-duplication (§7.2).
        columns: per-pair column name -> (dtype name, one value per pair).
    """

    pairs: list[Pair]
    vocab_size: int | None = None
    pad_id: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    columns: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)

    @property
    def max_id(self) -> int:
        """Largest id in the pairs and ``pad_id`` (-1 for no ids at all)."""
        ids = [max(max(p), max(c), max(r)) for p, c, r in self.pairs]
        return max(ids + [self.pad_id])

    def effective_vocab(self) -> int:
        """The vocab size the manifest must record."""
        return self.vocab_size if self.vocab_size is not None else self.max_id + 1

    def expected_dtype(self) -> str:
        """``"uint16"`` exactly when every id (and the vocabulary) fits, else ``"uint32"``."""
        return "uint16" if self.effective_vocab() <= UINT16_LIMIT else "uint32"

    def writer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`pairpack.Writer` (besides the path)."""
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id, "shard_bytes": self.shard_bytes,
                "dedup_window": self.dedup_window,
                "columns": {k: dt for k, (dt, _) in self.columns.items()}}

    def write(self, path: str | os.PathLike, **extra: Any) -> pairpack.Dataset:
        """Write this spec with :class:`pairpack.Writer` at ``path`` and open the result."""
        with pairpack.Writer(path, **self.writer_kwargs(), **extra) as w:
            for i, (p, c, r) in enumerate(self.pairs):
                w.add(p, c, r, **{k: vals[i] for k, (_, vals) in self.columns.items()})
        return pairpack.open(path)

    def column_array(self, name: str) -> np.ndarray:
        """The expected ``(N,)`` array of column ``name`` in its dtype."""
        dt, vals = self.columns[name]
        return np.asarray(vals, dtype=np.dtype(dt))


def expected_dedup(pairs: Sequence[Pair], shard_sizes: Sequence[int], window: int) -> list[tuple[int, int]]:
    """Reference model of prompt de-duplication (FORMAT.md §7.2): ``(num_prompts, num_tokens)`` per
    shard, for the given number of pairs in each shard.

    Within a shard a prompt is stored once if an identical prompt is among the ``window`` most
    recently *used* distinct prompts (LRU: a hit refreshes it); ``window <= 0`` stores every
    prompt. Completions are always stored. Shards never share tokens.
    """
    out = []
    pos = 0
    for size in shard_sizes:
        recent: OrderedDict[tuple[int, ...], None] = OrderedDict()
        prompts = tokens = 0
        for p, c, r in pairs[pos:pos + size]:
            key = tuple(p)
            if window > 0 and key in recent:
                recent.move_to_end(key)
            else:
                prompts += 1
                tokens += len(p)
                if window > 0:
                    recent[key] = None
                    if len(recent) > window:
                        recent.popitem(last=False)
            tokens += len(c) + len(r)
        out.append((prompts, tokens))
        pos += size
    return out


@st.composite
def datasets_spec(
    draw: st.DrawFn,
    *,
    min_pairs: int = 0,
    max_pairs: int = 12,
    columns: bool = True,
    allow_long: bool = True,
) -> DatasetSpec:
    """A :class:`DatasetSpec`: pairs from :func:`pair_lists` plus writer options.

    * ``vocab_size`` from :func:`vocab_sizes` (``None`` half the time);
    * ``pad_id`` 0, ``vocab - 1``, or an id that occurs in the data (masks must not depend on it);
    * ``shard_bytes`` the default (one shard) or 4..256 bytes (a shard per few pairs);
    * ``dedup_window`` the default or 0..3;
    * late widening (~1/6 of examples with pairs): every id < 65536 except in the last pair,
      which holds one id in [65536, 70000]; vocab then None, so the writer must widen shards
      already written;
    * up to three per-pair columns of whitelisted dtypes when ``columns``.
    """
    late_wide = draw(st.integers(0, 5)) == 0 and max_pairs >= 1
    if late_wide:
        pairs = draw(pair_lists(min_pairs=max(0, min_pairs - 1), max_pairs=max_pairs - 1, max_id=65535,
                                allow_long=allow_long))
        p, c, r = draw(pair_lists(min_pairs=1, max_pairs=1, max_id=65535, allow_long=False))[0]
        wide = draw(st.integers(UINT16_LIMIT, 70000))
        where = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
        if where == "prompt":
            p = p + [wide]
        elif where == "chosen":
            c = c + [wide]
        else:
            r = r + [wide]
        pairs = pairs + [(p, c, r)]
    else:
        pairs = draw(pair_lists(min_pairs=min_pairs, max_pairs=max_pairs, allow_long=allow_long))
    data_max = max([max(max(p), max(c), max(r)) for p, c, r in pairs] + [0])
    vocab = None if late_wide else draw(vocab_sizes(data_max))
    vocab_hi = (vocab if vocab is not None else min(data_max + 1, 1 << 32)) - 1
    pad_choices = [0, vocab_hi]
    if pairs:
        pad_choices.append(pairs[0][0][-1])  # a real token id: masks must come from lengths
    pad_id = draw(st.sampled_from(pad_choices))
    shard_bytes = draw(st.one_of(st.just(DEFAULT_SHARD_BYTES), st.integers(4, 256)))
    dedup_window = draw(st.one_of(st.just(DEFAULT_DEDUP_WINDOW), st.integers(0, 3)))
    cols: dict[str, tuple[str, list[Any]]] = {}
    if columns:
        names = draw(st.lists(st.sampled_from(["score", "ref_chosen", "ref_rejected", "k"]),
                              max_size=3, unique=True))
        for name in names:
            dt = draw(st.sampled_from(sorted(COLUMN_VALUES)))
            cols[name] = (dt, draw(st.lists(COLUMN_VALUES[dt], min_size=len(pairs), max_size=len(pairs))))
    return DatasetSpec(pairs=pairs, vocab_size=vocab, pad_id=pad_id, shard_bytes=shard_bytes,
                       dedup_window=dedup_window, columns=cols)


def scratch_dir() -> "tempfile.TemporaryDirectory[str]":
    """A temporary directory for one Hypothesis example, on tmpfs (/dev/shm) where there is one.

    The writer fsyncs every file and directory (FORMAT.md §9); on a disk that is most of the
    cost of a small test dataset, on tmpfs it is nearly free (about 5x faster examples here).
    """
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="pairpack-test-", dir=base)


# --- text ------------------------------------------------------------------------------------------
def texts(*, max_size: int = 12) -> st.SearchStrategy[str]:
    """Non-empty text of valid Unicode (no lone surrogates), including non-ASCII and control chars."""
    return st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=max_size)


@st.composite
def text_pair_lists(draw: st.DrawFn, *, min_pairs: int = 1, max_pairs: int = 8) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` strings; prompts drawn from a pool of 1..3 so some repeat."""
    n = draw(st.integers(min_pairs, max_pairs))
    pool = draw(st.lists(texts(), min_size=1, max_size=3))
    return [(draw(st.sampled_from(pool)), draw(texts()), draw(texts())) for _ in range(n)]
