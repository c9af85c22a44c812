"""Batch plans: truncation, batching by count or token budget, length grouping, padding efficiency.

Everything here works on the flat ``(3, N)`` int64 length array (rows prompt/chosen/rejected) and on
index arrays, vectorised; tokens are touched only by :func:`make_plan` (coordinates, no copy), by
:func:`identical_after_truncation` (the few pairs whose completions were cut to equal lengths) and
by ``assemble``. Shape legend: ``N`` pairs, ``B`` pairs per batch, ``W`` ranks.

Options are the frozen objects of :mod:`pairpack.batch.options` (:class:`Truncation`, the
truncation rule; :class:`PlanOptions`); the functions here also take their fields as keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import _accel
from .. import format as fmt
from ..errors import ArgumentError
from ..format.spec import round_up
from ..read.dataset import Pair, pair_indices
from .options import NO_TRUNCATION, OVERSIZE_MODES, TRUNCATION_MODES, OversizeError, PlanOptions, Truncation, options_from
from .packing import best_fit_order, pack_rows
from .sampling import equalize

if TYPE_CHECKING:  # torch is imported only where a batch is assembled
    from ..read.dataset import Dataset
    from .layouts import PackedBatch
    from .triplets import Triplets

__all__ = [
    "TRUNCATION_MODES",
    "OVERSIZE_MODES",
    "BatchPlan",
    "Collate",
    "truncate_lengths",
    "row_lengths",
    "effective_max_length",
    "oversize_mask",
    "plan_batches",
    "plan_rank",
    "batch_of",
    "served_pairs",
    "remove_served",
    "padding_efficiency",
    "padding_ceiling",
    "make_plan",
    "identical_after_truncation",
    "pack_rows",
    "tokens_processed",
    "check_oversize",
]

DEFAULT_GROUP_BATCHES = 512  # length-grouping window in batches per rank (0.95 of the ceiling needs >= ~256 on log-normal sigma 1)


# --- truncation and options (keyword front ends of pairpack.batch.options) ------------------------
def truncate_lengths(lengths: np.ndarray, max_length: int | None, min_completion_tokens: int = 1) -> np.ndarray:
    """int64 ``(3, N)``: prompt, chosen and rejected lengths after truncation to ``max_length``
    (:meth:`Truncation.lengths <pairpack.batch.options.Truncation.lengths>`). Raises ValueError when
    ``max_length < min_completion_tokens + 1`` (no room for a prompt token)."""
    return Truncation(max_length, "keep_end", min_completion_tokens).lengths(lengths)


def row_lengths(lengths: np.ndarray, max_length: int | None = None, min_completion_tokens: int = 1) -> np.ndarray:
    """int64 ``(N,)``: the padded length one pair needs, ``P' + max(C', R')`` after truncation."""
    return Truncation(max_length, "keep_end", min_completion_tokens).row_lengths(lengths)


def check_options(*, batch_size: int | None, max_tokens: int | None, max_length: int | None,
                  truncation: str = "keep_end", min_completion_tokens: int = 1,
                  pad_to_multiple_of: int | None = None, oversize: str = "truncate",
                  window: int | None = None, layout: str = "padded", max_row_tokens: int | None = None) -> None:
    """Raise ValueError for an inconsistent option set (keyword front end of :func:`check_plan`)."""
    opts = PlanOptions(batch_size=batch_size, max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of,
                       oversize=oversize, window=window, layout=layout, max_row_tokens=max_row_tokens)
    check_plan(opts, Truncation(max_length, truncation, min_completion_tokens))


def check_plan(opts: PlanOptions, trunc: Truncation) -> None:
    """Raise ValueError unless ``opts`` can plan batches: exactly one batch size, and a budget that
    holds the smallest pair truncation can leave (one prompt token, ``min_completion_tokens`` each)."""
    opts.require_size()
    k = trunc.min_completion_tokens
    if opts.max_tokens is not None:
        if opts.layout == "padded":
            one = round_up(k + 1, opts.pad_to_multiple_of)
            if opts.max_tokens < 2 * one:
                raise ArgumentError(f"max_tokens={opts.max_tokens} cannot hold even one pair of two rows of "
                                 f"{one} tokens (2 x padded length)")
    cap = opts.row_cap()
    if opts.packed and cap is not None:
        need = int(opts.pair_tokens(1, k, k))
        if cap < need:
            what = "max_row_tokens" if opts.max_row_tokens else "max_tokens"
            raise OversizeError(f"{what}={cap} cannot hold even the smallest {opts.layout} pair ({need} tokens: "
                                f"1 prompt token and min_completion_tokens={k} per completion); raise {what}")



def effective_max_length(max_length: int | None, max_tokens: int | None, pad_to_multiple_of: int | None = None,
                         oversize: str = "truncate") -> int | None:
    """The truncation length actually applied with the padded layout: with a token budget and
    ``oversize="truncate"`` a pair must fit alone, so the length is capped at ``floor(max_tokens / 2)``
    rounded down to the multiple (:meth:`PlanOptions.length_cap <pairpack.batch.options.PlanOptions.length_cap>`)."""
    cap = PlanOptions(max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of).length_cap()
    if cap is None or oversize != "truncate":
        return max_length
    return cap if max_length is None else min(max_length, cap)


def pair_need(lengths: np.ndarray, opts: PlanOptions, trunc: Truncation) -> np.ndarray:
    """int64 ``(N,)``: tokens one pair takes alone in ``opts.layout`` after truncation: padded
    ``2 * round_up(P' + max(C', R'), m)``; packed ``2P' + C' + R'``; prefix_shared ``P' + C' + R'``."""
    p, c, r = trunc.apply(lengths[0], lengths[1], lengths[2])
    return np.asarray(opts.pair_tokens(p, c, r), dtype=np.int64)


def oversize_mask(lengths: np.ndarray, max_tokens: int | None = None, *, max_length: int | None = None,
                  min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None,
                  options: PlanOptions | None = None, truncation: Truncation | None = None) -> np.ndarray:
    """bool ``(N,)``: pairs that alone exceed the budget after truncation: padded ``2 x`` padded row
    length over ``max_tokens``; packed layouts the pair over the row bound."""
    opts = options or PlanOptions(max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of)
    trunc = truncation or Truncation(max_length, "keep_end", min_completion_tokens)
    cap = opts.max_tokens if not opts.packed else opts.row_cap()
    if cap is None:
        return np.zeros(lengths.shape[1], dtype=bool)
    return pair_need(lengths, opts, trunc) > cap


def check_oversize(over: np.ndarray, opts: PlanOptions, where: str = "") -> None:
    """Raise :class:`~pairpack.batch.options.OversizeError` when ``over`` (from :func:`oversize_mask`)
    flags a pair and ``opts.oversize == "error"``: the one home of that message."""
    if opts.oversize != "error" or not over.any():
        return
    first = int(np.flatnonzero(over)[0])
    what = f"max_row_tokens={opts.max_row_tokens}" if opts.packed and opts.max_row_tokens else \
        f"max_tokens={opts.max_tokens}"
    raise OversizeError(f"{where + ': ' if where else ''}{int(over.sum())} pair(s) exceed {what} alone "
                        f"(first: pair {first}); use oversize='truncate' or 'skip', or max_length")


# --- planning --------------------------------------------------------------------------------------
_GATHER_CHUNK = 1 << 18  # pairs whose lengths are gathered at a time for a per-pair value of an epoch order


def _gathered(fn: Any, lengths: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """int64 ``(len(seq),)``: ``fn(lengths[:, seq])`` computed over chunks of ``_GATHER_CHUNK``
    pairs, so the gathered ``(3, n)`` lengths (24 bytes a pair) never exist whole."""
    n = len(seq)
    if n <= _GATHER_CHUNK:
        return np.asarray(fn(lengths[:, seq]), dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for a in range(0, n, _GATHER_CHUNK):
        out[a:a + _GATHER_CHUNK] = fn(lengths[:, seq[a:a + _GATHER_CHUNK]])
    return out


def _group(seq: np.ndarray, key: np.ndarray, window: int, descending: bool = False) -> np.ndarray:
    """Sort ``seq`` by ``key`` within consecutive windows of ``window`` entries (stable).

    Windows alternate ascending/descending so a batch that straddles two windows joins lengths
    that are alike (long with long, short with short); ``descending``: every window descending
    (the order best-fit packing into bounded rows wants). ``key`` (int64, the caller's temporary)
    is overwritten: the window number and the signed key become one sort key in place, so the
    only full-size temporaries are the stable argsort's (the same order as
    ``lexsort((signed key, window number))``).
    """
    n = len(seq)
    full = n // window
    k = np.asarray(key, dtype=np.int64)
    big = int(np.abs(k).max()) if n else 0
    span = 2 * big + 1
    if (full + 1) * span >= 1 << 62:  # a sort key could overflow int64: the two-key sort
        wid = np.arange(n, dtype=np.int64) // window
        signed = -k if descending else np.where(wid % 2 == 1, -k, k)
        return seq[np.lexsort((signed, wid))]
    if descending:
        np.negative(k, out=k)
    else:
        whole = k[:full * window].reshape(full, window)
        np.negative(whole[1::2], out=whole[1::2])
        if full % 2 == 1:  # the last, partial window is an odd one
            np.negative(k[full * window:], out=k[full * window:])
    k += big  # in [0, span)
    k[:full * window].reshape(full, window)[...] += (np.arange(full, dtype=np.int64) * span)[:, None]
    k[full * window:] += full * span
    return seq[np.argsort(k, kind="stable")]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair (int64), vectorised."""
    sizes = ends - starts
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    csum = np.cumsum(sizes)
    return np.arange(total, dtype=np.int64) - np.repeat(csum - sizes - starts, sizes)


def _greedy_bounds(cost_len: np.ndarray, max_tokens: int, rows: int = 2) -> np.ndarray:
    """Batch boundaries (int64 ``(NB + 1,)``) packing units in order under ``rows * k * max(L) <= max_tokens``.

    ``cost_len`` is each unit's padded length in sequence order (a pair's row, ``rows=2`` rows per
    pair; or a packed row, ``rows=1``). One numpy call per batch (not per unit): the cost
    ``rows * k * running_max`` is non-decreasing in ``k``, so ``searchsorted`` finds where a batch
    must end.
    """
    n = len(cost_len)
    bounds = [0]
    i = 0
    look = 64
    while i < n:
        hi = min(n, i + look)
        cm = np.maximum.accumulate(cost_len[i:hi])
        cost = rows * cm * np.arange(1, hi - i + 1, dtype=np.int64)
        k = int(np.searchsorted(cost, max_tokens, side="right"))
        if k == hi - i and hi < n:  # the batch may extend beyond the look-ahead: widen it
            look *= 2
            continue
        if k == 0:  # a single unit over the budget: callers remove or truncate these first
            raise OversizeError(f"pair at position {i} needs {int(cost[0])} tokens > max_tokens={max_tokens}")
        i += k
        bounds.append(i)
        look = max(16, 2 * k)
    return np.asarray(bounds, dtype=np.int64)


def _split_to_multiple(bounds: np.ndarray, world_size: int) -> np.ndarray:
    """Split the largest batches in two until the batch count divides ``world_size`` (when possible).

    Splitting never breaks the token budget, repeats or drops nothing, so ranks stay disjoint and
    their union stays the epoch.
    """
    need = (-(len(bounds) - 1)) % world_size
    if need == 0:
        return bounds
    b = bounds.tolist()
    for _ in range(need):
        sizes = np.diff(b)
        j = int(np.argmax(sizes)) if len(sizes) else 0
        if not len(sizes) or sizes[j] < 2:
            break
        b.insert(j + 1, b[j] + (int(sizes[j]) + 1) // 2)
    return np.asarray(b, dtype=np.int64)


def _budget_bounds(lengths: np.ndarray, seq: np.ndarray, opts: PlanOptions, trunc: Truncation,
                   world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair boundaries of the batches of ``seq`` under ``opts.max_tokens``, split to a multiple of
    ``world_size`` where possible, and ``seq`` (reordered when rows are bounded). Packed layouts:
    pairs go into rows next-fit (:func:`pack_rows`), or best-fit over every row with room when
    ``max_row_tokens`` bounds them (:func:`best_fit_order`; best-fit decreasing within each
    length-grouping window when grouped, as :func:`_global_plan` orders them),
    rows into batches of ``R * T <= max_tokens``; a batch is split at a row boundary (or, one row
    left, between pairs), so no split ever raises a batch's rows or row length."""
    assert opts.max_tokens is not None  # internal invariant: check_plan requires one of the two
    m = opts.pad_to_multiple_of
    if not opts.packed:
        cost = round_up(_gathered(trunc.row_lengths, lengths, seq), m)
        return seq, _split_to_multiple(_greedy_bounds(cost, opts.max_tokens), world_size)
    need = _gathered(lambda ln: pair_need(ln, opts, trunc), lengths, seq)
    bound = opts.row_bound()
    if opts.max_row_tokens and len(seq):  # bounded rows: best-fit tops them up (reordering seq)
        perm, rows = best_fit_order(need, bound)
        seq, need = seq[perm], need[perm]
    else:
        rows = pack_rows(need, bound)
    csum = np.concatenate([[0], np.cumsum(need)])
    row_len = round_up(csum[rows[1:]] - csum[rows[:-1]], m)
    per_batch = _split_to_multiple(_greedy_bounds(row_len, opts.max_tokens, rows=1), world_size)
    return seq, _split_to_multiple(rows[per_batch], world_size)


def _global_plan(lengths: np.ndarray, order: np.ndarray, opts: PlanOptions, trunc: Truncation,
                 seed: int | Sequence[int] = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's batches of one epoch: ``(seq, starts, ends)`` where batch ``j`` of rank ``r``
    is ``seq[starts[j * W + r]:ends[j * W + r]]`` (``W`` = world size; batches in serving order).
    ``trunc`` is the truncation applied (budget cap included); see :func:`plan_batches`."""
    check_plan(opts, trunc)
    order = np.asarray(order, dtype=np.int64)
    rng = np.random.default_rng(seed)
    w = world_size
    group, window, drop_last = opts.group_by_length, opts.window, opts.drop_last
    if opts.batch_size is not None:
        # DistributedSampler semantics on pairs: every rank gets m pairs, then batches of B.
        b = opts.batch_size
        seq = equalize(order, w, drop_last)
        m = len(seq) // w
        if group and len(seq):
            win = round_up(window or DEFAULT_GROUP_BATCHES * b * w, b * w)
            seq = _group(seq, _gathered(trunc.row_lengths, lengths, seq), win)
        nfull, rem = divmod(m, b)
        full = seq[: nfull * b * w].reshape(nfull, b, w)
        if group and nfull > 1:
            full = full[rng.permutation(nfull)]  # grouped batches in random order
        # global batch j holds b*w consecutive entries; rank r takes every w-th from r: laid out
        # here as w contiguous runs of b per batch round (then the tail round of rem per rank)
        parts = [full.transpose(0, 2, 1).reshape(-1)]
        sizes = [np.full(nfull * w, b, dtype=np.int64)]
        if rem and not drop_last:
            parts.append(seq[nfull * b * w:].reshape(rem, w).T.reshape(-1))
            sizes.append(np.full(w, rem, dtype=np.int64))
        ends = np.cumsum(np.concatenate(sizes))
        return np.ascontiguousarray(np.concatenate(parts)), ends - np.concatenate(sizes), ends
    # token budget: pack pairs greedily in (grouped) order, then deal batches to ranks round by round
    assert opts.max_tokens is not None  # internal invariant: check_plan requires one of the two
    seq = order
    if group and len(seq):
        if window is None:
            mean = float(trunc.row_lengths(lengths[:, seq[:4096]]).mean())
            window = DEFAULT_GROUP_BATCHES * w * max(1, int(opts.max_tokens // (2 * max(mean, 1.0))))
        if opts.packed and opts.max_row_tokens:  # bounded rows: sizes decreasing for best-fit (_budget_bounds)
            seq = _group(seq, _gathered(lambda ln: pair_need(ln, opts, trunc), lengths, seq), window,
                         descending=True)
        else:
            seq = _group(seq, _gathered(trunc.row_lengths, lengths, seq), window)
    seq, bounds = _budget_bounds(lengths, seq, opts, trunc, w)
    starts, ends = bounds[:-1], bounds[1:]
    nb = len(starts)
    if nb % w:  # fewer pairs than ranks: trim, or repeat batches from the start (DistributedSampler)
        keep = nb // w * w if drop_last else -(-nb // w) * w
        pick = np.resize(np.arange(nb), keep) if nb else np.zeros(0, dtype=np.int64)
        starts, ends, nb = starts[pick], ends[pick], keep
    rounds = nb // w
    rid = rng.permutation(rounds) if group and rounds > 1 else np.arange(rounds)
    g = (rid[:, None] * w + np.arange(w)).reshape(-1)  # serving order: round by round, rank by rank
    return seq, starts[g], ends[g]


def plan_rank(lengths: np.ndarray, order: np.ndarray, *, options: PlanOptions | None = None,
              truncation: Truncation | None = None, seed: int | Sequence[int] = 0, rank: int = 0,
              world_size: int = 1, **keywords: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s batches of one epoch as CSR: (pair indices int64 ``(n,)``, offsets int64 ``(NB + 1,)``).

    Batch ``j`` is ``indices[offsets[j]:offsets[j + 1]]``. See :func:`plan_batches` for the
    options (objects or keywords); ``lengths`` must be the untruncated ``(3, N)`` lengths and the
    truncation the effective one (pairs over the budget already removed from ``order``).
    """
    if not 0 <= rank < world_size:
        raise ArgumentError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    opts, trunc = options_from(options, truncation, **keywords)
    seq, starts, ends = _global_plan(lengths, order, opts, trunc, seed, world_size)
    s, e = starts[rank::world_size], ends[rank::world_size]
    offsets = np.concatenate([[0], np.cumsum(e - s)]).astype(np.int64)
    return np.ascontiguousarray(seq[_ranges(s, e)]), offsets


def served_pairs(lengths: np.ndarray, order: np.ndarray, *, position: int, world_size: int,
                 options: PlanOptions, truncation: Truncation, seed: int | Sequence[int] = 0) -> np.ndarray:
    """The pair indices every rank of a ``world_size`` job was served in its first ``position``
    batches of the epoch that ``order`` and the options (as for :func:`plan_rank`) describe: what
    an elastic resume must not serve again. int64, in serving order (a pair the
    DistributedSampler rule repeats appears as often as it was served)."""
    seq, starts, ends = _global_plan(lengths, order, options, truncation, seed, world_size)
    k = min(max(position, 0) * world_size, len(starts))
    return seq[_ranges(starts[:k], ends[:k])]


def remove_served(order: np.ndarray, served: np.ndarray) -> np.ndarray:
    """``order`` without what ``served`` took, as multisets (int64, in order): a pair served
    ``k`` times loses its first ``k`` occurrences in ``order`` (a mixture's epoch may draw a pair
    several times; for an order without repeats this is ``order[~np.isin(order, served)]``)."""
    order = np.asarray(order, dtype=np.int64)
    if not len(served) or not len(order):
        return order
    vals, cnt = np.unique(np.asarray(served, dtype=np.int64), return_counts=True)
    pos = np.minimum(np.searchsorted(vals, order), len(vals) - 1)
    need = np.where(vals[pos] == order, cnt[pos], 0)
    srt = np.argsort(order, kind="stable")
    so = order[srt]
    n = len(order)
    first = np.ones(n, dtype=bool)
    first[1:] = so[1:] != so[:-1]
    run_start = np.maximum.accumulate(np.where(first, np.arange(n, dtype=np.int64), 0))
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[srt] = np.arange(n, dtype=np.int64) - run_start
    return order[occurrence >= need]


def plan_batches(lengths: np.ndarray, order: np.ndarray, *, options: PlanOptions | None = None,
                 truncation: Truncation | None = None, seed: int | Sequence[int] = 0, rank: int = 0,
                 world_size: int = 1, **keywords: Any) -> list[np.ndarray]:
    """Split an epoch order into batches of pair indices (one rank's share), as the Loader does.

    Args:
        lengths: int64 ``(3, N)`` prompt/chosen/rejected lengths (``Dataset.lengths``), untruncated.
        order: int64 pair indices in epoch order (e.g. :func:`pairpack.batch.sampling.epoch_order`).
        options: a :class:`~pairpack.batch.options.PlanOptions`, or its fields as keywords
            (``batch_size=``, ``max_tokens=``, ``group_by_length=``, ``window=``, ``drop_last=``,
            ``oversize=``, ``pad_to_multiple_of=``, ``layout=``, ``max_row_tokens=``).
            ``batch_size``: ranks are equalised on pairs as ``DistributedSampler`` does
            (``drop_last`` trims the tail, else it is padded by repeating the first pairs;
            ``drop_last`` also drops a final short batch). ``max_tokens``: batches never exceed
            the budget and are split until their count divides ``world_size``, so ranks get equal
            batch counts without repeating or dropping pairs (only with fewer pairs than ranks
            are batches repeated, or dropped with ``drop_last``). ``group_by_length``: sort pairs
            by padded length within windows of ``window`` pairs of the (shuffled) order, then
            shuffle the batches (rank-aligned). ``oversize``: a pair over the budget alone is
            truncated, skipped or raises :class:`~pairpack.batch.options.OversizeError`.
        truncation: a :class:`~pairpack.batch.options.Truncation`, or ``max_length=``,
            ``truncation=`` (mode) and ``min_completion_tokens=`` keywords.
        seed: seed of the batch shuffle under grouping (int or sequence, as numpy's ``default_rng``).
        rank, world_size: which share to return.

    Returns:
        list of int64 arrays, one per batch, in iteration order.
    """
    opts, trunc = options_from(options, truncation, **keywords)
    check_plan(opts, trunc)
    order = np.asarray(order, dtype=np.int64)
    eff = opts.max_length_cap(trunc)
    over = oversize_mask(lengths, options=opts, truncation=eff)
    if over.any():
        check_oversize(over, opts)
        order = order[~over[order]]
    flat, offsets = plan_rank(lengths, order, options=opts, truncation=eff, seed=seed, rank=rank,
                              world_size=world_size)
    return np.split(flat, offsets[1:-1]) if len(offsets) > 1 else []


def _batch_totals(lengths: np.ndarray, batches: Sequence[np.ndarray], trunc: Truncation,
                  opts: PlanOptions) -> tuple[int, int]:
    """(real tokens, tokens processed) over ``batches`` in ``opts.layout`` (packed layouts: rows
    re-packed as the builder packs them, one :func:`pack_rows` per batch)."""
    batches = [np.asarray(b, dtype=np.int64) for b in batches if len(b)]
    if not batches:
        return 0, 0
    flat = np.concatenate(batches)
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    p, c, r = trunc.apply(lengths[0, flat], lengths[1, flat], lengths[2, flat])
    m = opts.pad_to_multiple_of
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if not opts.packed:
        real = int((2 * p + c + r).sum())
        lmax = round_up(np.maximum.reduceat(p + np.maximum(c, r), starts), m)
        return real, int((2 * sizes * lmax).sum())
    need = np.asarray(opts.pair_tokens(p, c, r), dtype=np.int64)
    cap = opts.row_bound()
    processed = 0
    for a, n in zip(starts.tolist(), sizes.tolist()):  # per batch: rows come from pack_rows
        nd = need[a:a + n]
        rows = pack_rows(nd, cap)
        cs = np.concatenate([[0], np.cumsum(nd)])
        processed += (len(rows) - 1) * int(round_up(int((cs[rows[1:]] - cs[rows[:-1]]).max()), m))
    return int(need.sum()), processed


def padding_efficiency(lengths: np.ndarray, batches: Sequence[np.ndarray], max_length: int | None = None, *,
                       min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None,
                       max_tokens: int | None = None, oversize: str = "truncate",
                       options: PlanOptions | None = None, truncation: Truncation | None = None) -> float:
    """Real tokens / tokens processed over ``batches`` in the layout (padded: both rows counted), as
    the Loader assembles them.

    Pass the same options as to :func:`plan_batches` (objects, or ``max_length``/``max_tokens``/
    ``oversize``/``pad_to_multiple_of`` keywords): with a token budget and ``oversize="truncate"``
    the truncation applied is the capped one. Returns 1.0 for no batches.
    """
    opts = options or PlanOptions(max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of, oversize=oversize)
    trunc = truncation or Truncation(max_length, "keep_end", min_completion_tokens)
    real, padded = _batch_totals(lengths, batches, opts.max_length_cap(trunc), opts)
    return real / padded if padded else 1.0


def tokens_processed(lengths: np.ndarray, batches: Sequence[np.ndarray], options: PlanOptions,
                     truncation: Truncation = Truncation()) -> int:
    """Tokens the model processes over ``batches`` in ``options.layout`` (padding included)."""
    return _batch_totals(lengths, batches, options.max_length_cap(truncation), options)[1]


def padding_ceiling(lengths: np.ndarray, max_length: int | None = None, *, min_completion_tokens: int = 1) -> float:
    """The best padding efficiency possible: ``sum(2P + C + R) / sum(2 (P + max(C, R)))``.

    Both rows of a pair share one padded length, so even a batch of one pair pads the shorter
    completion.
    """
    p, c, r = Truncation(max_length, "keep_end", min_completion_tokens).apply(lengths[0], lengths[1], lengths[2])
    den = int((2 * (p + np.maximum(c, r))).sum())
    return int((2 * p + c + r).sum()) / den if den else 1.0


# --- plans that touch the dataset ------------------------------------------------------------------
@dataclass
class BatchPlan:
    """Everything needed to assemble one batch, nothing copied yet: the arguments of ``assemble``.

    Attributes:
        tokens: per pair, the 1-D token array (a shard's memory map) its segments live in (``B``).
        prompt_starts, prompt_lengths: int64 ``(B,)``, after truncation.
        completion_starts, completion_lengths: int64 ``(2, B)``, row 0 chosen, row 1 rejected, after
            truncation.
        indices: int64 ``(B,)`` dataset indices.
        columns: per-pair column values, name -> ``(B,)`` array.
        shards, shard_of, longest: optional shortcuts for :func:`~pairpack.batch.triplets.assemble`
            (the distinct token arrays, each pair's position in them, the longest row), as
            :meth:`Dataset.take <pairpack.read.dataset.Dataset.take>` gives them.
    """

    tokens: list[np.ndarray]
    prompt_starts: np.ndarray
    prompt_lengths: np.ndarray
    completion_starts: np.ndarray
    completion_lengths: np.ndarray
    indices: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    shards: tuple[np.ndarray, ...] | None = None
    shard_of: np.ndarray | None = None
    longest: int | None = None

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def args(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The positional arguments of :func:`pairpack.batch.triplets.assemble`."""
        return self.tokens, self.prompt_starts, self.prompt_lengths, self.completion_starts, self.completion_lengths

    def assemble(self, pad_id: int, *, options: PlanOptions | None = None,
                 pad_to_multiple_of: int | None = None) -> "Triplets | PackedBatch":
        """The batch as CPU tensors in ``options.layout`` (default padded :class:`~pairpack.Triplets`;
        ``pad_to_multiple_of`` is the keyword form of ``options.pad_to_multiple_of``)."""
        opts = options or (PlanOptions(pad_to_multiple_of=pad_to_multiple_of) if pad_to_multiple_of else _PADDED)
        if opts.packed:
            from .layouts import build

            return build(self, pad_id, opts)
        from .triplets import assemble

        return assemble(*self.args(), pad_id=pad_id, pad_to_multiple_of=opts.pad_to_multiple_of,
                        indices=self.indices, columns=self.columns, shards=self.shards, shard_of=self.shard_of,
                        longest=self.longest)


_PADDED = PlanOptions()


def batch_of(ds: "Dataset", indices: np.ndarray, *, options: PlanOptions | None = None,
             truncation: Truncation | None = None, columns: Sequence[str] = ()) -> "Triplets | PackedBatch":
    """The batch of pairs ``indices`` of ``ds`` (the one way to ask for a batch: ``Dataset.batch``,
    ``Collate`` and the Loader call it): truncated by ``truncation``, laid out per ``options``
    (``layout``, ``pad_to_multiple_of``, ``max_row_tokens``). When no row needs cutting every layout
    takes the C kernels' two calls (``take``, then ``assemble`` or ``layout``), else :func:`make_plan`
    then assemble (same bytes)."""
    opts = options or _PADDED
    trunc = truncation or NO_TRUNCATION
    nat = _accel.native
    if nat is not None and not opts.packed:
        got = ds._batch_native(nat, indices, opts.pad_to_multiple_of, columns, trunc.max_length)
        if got is not None:
            return got
    elif nat is not None:
        located = ds._located(nat, indices, trunc.max_length)
        if located is not None:  # the packed layouts' two C calls: locate, then layout (no plan)
            from .layouts import build_located

            toks, coords, _ = located
            cols = ds._columns_at(columns, coords[0]) if columns else None
            return build_located(nat, toks, coords, ds.pad_id, opts, cols)
    return make_plan(ds, indices, truncation=trunc, columns=columns).assemble(ds.pad_id, options=opts)


def make_plan(ds: "Dataset", indices: np.ndarray, *, truncation: Truncation | None = None,
              columns: Sequence[str] = ()) -> BatchPlan:
    """The :class:`BatchPlan` of pairs ``indices`` of ``ds``, truncated by ``truncation`` (vectorised)."""
    t = ds.take(indices, columns)
    st, ln = t.starts, t.lengths
    trunc = truncation or NO_TRUNCATION
    m = trunc.max_length
    if m is None or (t.longest is not None and t.longest <= m):  # nothing to cut
        return BatchPlan(t.tokens, st[fmt.PROMPT], ln[fmt.PROMPT], st[1:], ln[1:], t.indices, t.columns,
                         t.shards, t.shard_of, t.longest)
    p, c, r = trunc.apply(ln[fmt.PROMPT], ln[fmt.CHOSEN], ln[fmt.REJECTED])
    ps = st[fmt.PROMPT] + trunc.prompt_offset(ln[fmt.PROMPT], p)
    return BatchPlan(t.tokens, ps, p, st[1:], np.stack([c, r]), t.indices, t.columns, t.shards, t.shard_of)


def identical_after_truncation(ds: "Dataset", indices: np.ndarray | None = None, *,
                               truncation: Truncation | None = None, max_length: int | None = None,
                               min_completion_tokens: int = 1, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """bool mask over ``indices`` (default: all pairs): chosen == rejected only because of truncation.

    Only pairs :meth:`~pairpack.batch.options.Truncation.cut_to_equal` flags are compared, with
    one vectorised gather per shard and chunk of at most ``chunk_tokens`` tokens; pairs identical
    in the data itself are not flagged (the build reports those). ``truncation`` or the
    ``max_length``/``min_completion_tokens`` keywords.
    """
    trunc = truncation or Truncation(max_length, "keep_end", min_completion_tokens)
    lengths = ds.lengths
    idx = np.arange(len(ds), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros(len(idx), dtype=bool)
    if not trunc.active or not len(idx):
        return out
    ln = lengths[:, idx]
    cut = trunc.lengths(ln)
    cand = np.flatnonzero(trunc.cut_to_equal(ln, cut))
    c2 = cut[1]
    a = 0
    while a < len(cand):
        # chunk so the gathered index arrays stay bounded whatever the candidate count
        csum = np.cumsum(c2[cand[a:]])
        b = a + max(1, int(np.searchsorted(csum, chunk_tokens, side="right")))
        sel = cand[a:b]
        tokens, st, _ = ds.segments(idx[sel])
        n = c2[sel]
        groups: dict[int, list[int]] = {}
        for j, t in enumerate(tokens):
            groups.setdefault(id(t), []).append(j)
        for js in groups.values():
            js_a = np.asarray(js, dtype=np.int64)
            tok = tokens[js[0]]
            lens = n[js_a]
            ci = _ranges(st[fmt.CHOSEN, js_a], st[fmt.CHOSEN, js_a] + lens)
            ri = _ranges(st[fmt.REJECTED, js_a], st[fmt.REJECTED, js_a] + lens)
            diff = np.add.reduceat((tok[ci] != tok[ri]).astype(np.int64),
                                   np.concatenate([[0], np.cumsum(lens)[:-1]]))
            out[sel[js_a[diff == 0]]] = True
        a = b
    return out


class Collate:
    """A ``collate_fn`` for a plain ``torch.utils.data.DataLoader``: a list of pair indices -> a batch.

    The index list is vectorised in one piece (truncation, one ``assemble``); use it with any
    sampler over ``range(len(ds))``::

        DataLoader(range(len(ds)), batch_size=32, shuffle=True, collate_fn=Collate(ds, max_length=1024))
        DataLoader(range(len(ds)), sampler=DistributedSampler(range(len(ds))), batch_size=32,
                   collate_fn=Collate(ds, layout="prefix_shared"), num_workers=2)

    Options: ``truncation`` (a :class:`~pairpack.batch.options.Truncation`, or ``max_length=``,
    ``truncation="keep_end"``, ``min_completion_tokens=``) and ``options`` (a
    :class:`~pairpack.batch.options.PlanOptions` for ``layout``, ``pad_to_multiple_of``,
    ``max_row_tokens``, or those keywords). A list of :class:`~pairpack.Pair`
    (``DataLoader(ds, collate_fn=Collate(ds))``) also works for the padded layout; the indices of
    the result are then -1 (a Pair does not know its index). Pairs whose chosen and rejected
    become identical through truncation are left out and counted in ``self.dropped`` (per
    process: each DataLoader worker has its own copy).
    """

    def __init__(self, ds: "Dataset", *, options: PlanOptions | None = None,
                 truncation: "Truncation | str | None" = None, columns: Sequence[str] = (), **keywords: Any) -> None:
        self.options, self.truncation = options_from(options, truncation, **keywords)
        self.ds = ds
        self.columns = tuple(columns)
        self.dropped = 0

    def __call__(self, items: Sequence[Any]) -> "Triplets | PackedBatch":
        if len(items) and isinstance(items[0], Pair):
            return self._from_pairs(items)
        idx = pair_indices(items)
        same = identical_after_truncation(self.ds, idx, truncation=self.truncation)
        if same.any():
            self.dropped += int(same.sum())
            idx = idx[~same]
        return batch_of(self.ds, idx, options=self.options, truncation=self.truncation, columns=self.columns)

    def _from_pairs(self, pairs: Sequence["Pair"]) -> "Triplets":
        from .triplets import assemble

        if self.columns:
            raise ArgumentError("columns need pair indices: use DataLoader(range(len(ds)), ...) with Collate")
        if self.options.packed:
            raise ArgumentError(f"layout={self.options.layout!r} needs pair indices: use "
                             f"DataLoader(range(len(ds)), ...) with Collate")
        trunc = self.truncation
        ln = np.array([[len(q.prompt), len(q.chosen), len(q.rejected)] for q in pairs], dtype=np.int64).T
        ln = ln.reshape(3, -1)
        cut = trunc.lengths(ln)
        keep = np.ones(len(pairs), dtype=bool)
        if trunc.active:
            for j in np.flatnonzero(trunc.cut_to_equal(ln, cut)).tolist():
                keep[j] = not np.array_equal(pairs[j].chosen[: cut[1, j]], pairs[j].rejected[: cut[2, j]])
            self.dropped += int((~keep).sum())
        # one small joined array per pair (prompt, chosen, rejected): this path copies once more
        # than the index path, which is why Collate prefers indices
        tokens = [np.concatenate(q) for q, k in zip(pairs, keep) if k]
        ln, cut = ln[:, keep], cut[:, keep]
        ps = np.zeros(ln.shape[1], dtype=np.int64) + trunc.prompt_offset(ln[0], cut[0])
        cs = np.stack([ln[0], ln[0] + ln[1]])
        return assemble(tokens, ps, cut[0], cs, cut[1:], pad_id=self.ds.pad_id,
                        pad_to_multiple_of=self.options.pad_to_multiple_of,
                        indices=np.full(ln.shape[1], -1, dtype=np.int64))
