"""Batch plans: truncation, batching by count or token budget, length grouping, padding efficiency.

Everything here works on the flat ``(3, N)`` int64 length array (rows prompt/chosen/rejected) and on
index arrays, vectorised; tokens are touched only by :func:`make_plan` (coordinates, no copy), by
:func:`identical_after_truncation` (the few pairs whose completions were cut to equal lengths) and
by ``assemble``. Shape legend: ``N`` pairs, ``B`` pairs per batch, ``W`` ranks.

Truncation (``max_length``) is applied identically to both rows of a pair: if ``P + C`` or
``P + R`` exceeds ``max_length``, completions are cut first (from their end) down to
``min_completion_tokens``, then the prompt loses tokens from its start (``keep_end``) or its end
(``keep_start``). Since ``max_length > min_completion_tokens`` is required, ``P >= 1`` and both
completions keep ``>= 1`` token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import _accel
from .. import format as fmt
from ..errors import PairpackError
from ..read.dataset import Pair
from .sampling import equalize

if TYPE_CHECKING:  # torch is imported only where a batch is assembled
    from ..read.dataset import Dataset
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
    "padding_efficiency",
    "padding_ceiling",
    "make_plan",
    "identical_after_truncation",
]

TRUNCATION_MODES = ("keep_end", "keep_start")
OVERSIZE_MODES = ("truncate", "skip", "error")
DEFAULT_GROUP_BATCHES = 512  # length-grouping window in batches per rank (0.95 of the ceiling needs >= ~256 on log-normal sigma 1)


def _round_up(x: np.ndarray | int, m: int | None) -> Any:
    return -(-x // m) * m if m else x


# --- truncation arithmetic -----------------------------------------------------------------------
def _truncate3(p: np.ndarray, c: np.ndarray, r: np.ndarray, max_length: int | None,
               min_completion_tokens: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if max_length is None:
        return p, c, r
    cap = np.maximum(max_length - p, min_completion_tokens)
    c2, r2 = np.minimum(c, cap), np.minimum(r, cap)
    p2 = np.minimum(p, max_length - np.maximum(c2, r2))
    return p2, c2, r2


def truncate_lengths(lengths: np.ndarray, max_length: int | None, min_completion_tokens: int = 1) -> np.ndarray:
    """int64 ``(3, N)``: prompt, chosen and rejected lengths after truncation to ``max_length``.

    Completions are cut first, to ``max(max_length - P, min_completion_tokens)`` (a completion
    already shorter keeps its length), then the prompt to ``max_length - max(C', R')``. With
    ``max_length=None`` the input is returned unchanged. Raises ValueError when
    ``max_length < min_completion_tokens + 1`` (no room for a prompt token).
    """
    ln = np.asarray(lengths, dtype=np.int64)
    if max_length is None:
        return ln
    if min_completion_tokens < 1 or max_length < min_completion_tokens + 1:
        raise ValueError(f"max_length={max_length} must be >= min_completion_tokens + 1 = "
                         f"{min_completion_tokens + 1} (min_completion_tokens >= 1)")
    return np.stack(_truncate3(ln[0], ln[1], ln[2], max_length, min_completion_tokens))


def row_lengths(lengths: np.ndarray, max_length: int | None = None, min_completion_tokens: int = 1) -> np.ndarray:
    """int64 ``(N,)``: the padded length one pair needs, ``P' + max(C', R')`` after truncation."""
    p, c, r = _truncate3(lengths[0], lengths[1], lengths[2], max_length, min_completion_tokens)
    return p + np.maximum(c, r)


def check_options(*, batch_size: int | None, max_tokens: int | None, max_length: int | None,
                  truncation: str = "keep_end", min_completion_tokens: int = 1,
                  pad_to_multiple_of: int | None = None, oversize: str = "truncate",
                  window: int | None = None) -> None:
    """Raise ValueError for an inconsistent option set (shared by the planner and the loader)."""
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of batch_size (pairs per batch) and max_tokens (token budget)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if oversize not in OVERSIZE_MODES:
        raise ValueError(f"oversize must be one of {OVERSIZE_MODES}, got {oversize!r}")
    if min_completion_tokens < 1:
        raise ValueError(f"min_completion_tokens must be >= 1, got {min_completion_tokens}")
    if max_length is not None and max_length < min_completion_tokens + 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt token and "
                         f"min_completion_tokens={min_completion_tokens}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if max_tokens is not None:
        one = _round_up(min_completion_tokens + 1, pad_to_multiple_of)
        if max_tokens < 2 * one:
            raise ValueError(f"max_tokens={max_tokens} cannot hold even one pair of two rows of "
                             f"{one} tokens (2 x padded length)")


def effective_max_length(max_length: int | None, max_tokens: int | None, pad_to_multiple_of: int | None = None,
                         oversize: str = "truncate") -> int | None:
    """The truncation length actually applied.

    With a token budget and ``oversize="truncate"``, a pair must fit alone: its two rows, padded to
    ``pad_to_multiple_of``, take at most ``max_tokens``, so the length is capped at
    ``floor(max_tokens / 2)`` rounded down to the multiple.
    """
    if max_tokens is None or oversize != "truncate":
        return max_length
    cap = max_tokens // 2
    if pad_to_multiple_of:
        cap = cap // pad_to_multiple_of * pad_to_multiple_of
    return cap if max_length is None else min(max_length, cap)


def oversize_mask(lengths: np.ndarray, max_tokens: int | None, *, max_length: int | None = None,
                  min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None) -> np.ndarray:
    """bool ``(N,)``: pairs that alone exceed ``max_tokens`` (2 x padded row length) after truncation."""
    if max_tokens is None:
        return np.zeros(lengths.shape[1], dtype=bool)
    row = _round_up(row_lengths(lengths, max_length, min_completion_tokens), pad_to_multiple_of)
    return 2 * row > max_tokens


# --- planning --------------------------------------------------------------------------------------
def _group(seq: np.ndarray, key: np.ndarray, window: int) -> np.ndarray:
    """Sort ``seq`` by ``key`` within consecutive windows of ``window`` entries (stable).

    Windows alternate ascending/descending so a batch that straddles two windows joins lengths
    that are alike (long with long, short with short).
    """
    wid = np.arange(len(seq), dtype=np.int64) // window
    k = np.where(wid % 2 == 1, -key, key)
    return seq[np.lexsort((k, wid))]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair (int64), vectorised."""
    sizes = ends - starts
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    csum = np.cumsum(sizes)
    return np.arange(total, dtype=np.int64) - np.repeat(csum - sizes - starts, sizes)


def _greedy_bounds(cost_len: np.ndarray, max_tokens: int) -> np.ndarray:
    """Batch boundaries (int64 ``(NB + 1,)``) packing rows in order under ``2 * B * max(L) <= max_tokens``.

    ``cost_len`` is each pair's padded row length in sequence order. One numpy call per batch (not
    per pair): the cost ``2 * k * running_max`` is non-decreasing in ``k``, so ``searchsorted``
    finds where a batch must end.
    """
    n = len(cost_len)
    bounds = [0]
    i = 0
    look = 64
    while i < n:
        hi = min(n, i + look)
        cm = np.maximum.accumulate(cost_len[i:hi])
        cost = 2 * cm * np.arange(1, hi - i + 1, dtype=np.int64)
        k = int(np.searchsorted(cost, max_tokens, side="right"))
        if k == hi - i and hi < n:  # the batch may extend beyond the look-ahead: widen it
            look *= 2
            continue
        if k == 0:  # a single pair over the budget: callers remove or truncate these first
            raise ValueError(f"pair at position {i} needs {int(cost[0])} padded tokens > max_tokens={max_tokens}")
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


def _global_plan(lengths: np.ndarray, order: np.ndarray, *, batch_size: int | None = None,
                 max_tokens: int | None = None, group_by_length: bool = False, window: int | None = None,
                 seed: int | Sequence[int] = 0, drop_last: bool = False, max_length: int | None = None,
                 min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None,
                 world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's batches of one epoch: ``(seq, starts, ends)`` where batch ``j`` of rank ``r``
    is ``seq[starts[j * W + r]:ends[j * W + r]]`` (``W`` = world size; batches in serving order).
    Options as for :func:`plan_rank`."""
    check_options(batch_size=batch_size, max_tokens=max_tokens, max_length=max_length,
                  min_completion_tokens=min_completion_tokens, pad_to_multiple_of=pad_to_multiple_of,
                  window=window)
    order = np.asarray(order, dtype=np.int64)
    rng = np.random.default_rng(seed)
    w = world_size
    if batch_size is not None:
        # DistributedSampler semantics on pairs: every rank gets m pairs, then batches of B.
        b = batch_size
        seq = equalize(order, w, drop_last)
        m = len(seq) // w
        if group_by_length and len(seq):
            win = _round_up(window or DEFAULT_GROUP_BATCHES * b * w, b * w)
            seq = _group(seq, row_lengths(lengths[:, seq], max_length, min_completion_tokens), win)
        nfull, rem = divmod(m, b)
        full = seq[: nfull * b * w].reshape(nfull, b, w)
        if group_by_length and nfull > 1:
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
    assert max_tokens is not None  # internal invariant: check_options requires one of the two
    seq = order
    if group_by_length and len(seq):
        if window is None:
            mean = float(row_lengths(lengths[:, seq[:4096]], max_length, min_completion_tokens).mean())
            window = DEFAULT_GROUP_BATCHES * w * max(1, int(max_tokens // (2 * max(mean, 1.0))))
        seq = _group(seq, row_lengths(lengths[:, seq], max_length, min_completion_tokens), window)
    cost = _round_up(row_lengths(lengths[:, seq], max_length, min_completion_tokens), pad_to_multiple_of)
    bounds = _greedy_bounds(cost, max_tokens)
    bounds = _split_to_multiple(bounds, w)
    starts, ends = bounds[:-1], bounds[1:]
    nb = len(starts)
    if nb % w:  # fewer pairs than ranks: trim, or repeat batches from the start (DistributedSampler)
        keep = nb // w * w if drop_last else -(-nb // w) * w
        pick = np.resize(np.arange(nb), keep) if nb else np.zeros(0, dtype=np.int64)
        starts, ends, nb = starts[pick], ends[pick], keep
    rounds = nb // w
    rid = rng.permutation(rounds) if group_by_length and rounds > 1 else np.arange(rounds)
    g = (rid[:, None] * w + np.arange(w)).reshape(-1)  # serving order: round by round, rank by rank
    return seq, starts[g], ends[g]


def plan_rank(
    lengths: np.ndarray,
    order: np.ndarray,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    group_by_length: bool = False,
    window: int | None = None,
    seed: int | Sequence[int] = 0,
    drop_last: bool = False,
    max_length: int | None = None,
    min_completion_tokens: int = 1,
    pad_to_multiple_of: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s batches of one epoch as CSR: (pair indices int64 ``(n,)``, offsets int64 ``(NB + 1,)``).

    Batch ``j`` is ``indices[offsets[j]:offsets[j + 1]]``. See :func:`plan_batches` for the
    arguments; ``lengths`` must be the untruncated ``(3, N)`` lengths and ``max_length`` the
    effective truncation length (pairs over the budget already removed from ``order``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    seq, starts, ends = _global_plan(
        lengths, order, batch_size=batch_size, max_tokens=max_tokens, group_by_length=group_by_length,
        window=window, seed=seed, drop_last=drop_last, max_length=max_length,
        min_completion_tokens=min_completion_tokens, pad_to_multiple_of=pad_to_multiple_of, world_size=world_size)
    s, e = starts[rank::world_size], ends[rank::world_size]
    offsets = np.concatenate([[0], np.cumsum(e - s)]).astype(np.int64)
    return np.ascontiguousarray(seq[_ranges(s, e)]), offsets


def served_pairs(lengths: np.ndarray, order: np.ndarray, *, position: int, world_size: int,
                 **options: Any) -> np.ndarray:
    """The pair indices every rank of a ``world_size`` job was served in its first ``position``
    batches of the epoch that ``order`` and ``options`` (as for :func:`plan_rank`) describe: what
    an elastic resume must not serve again. int64, in serving order (a pair the
    DistributedSampler rule repeats appears as often as it was served)."""
    seq, starts, ends = _global_plan(lengths, order, world_size=world_size, **options)
    k = min(max(position, 0) * world_size, len(starts))
    return seq[_ranges(starts[:k], ends[:k])]


def plan_batches(
    lengths: np.ndarray,
    order: np.ndarray,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    group_by_length: bool = False,
    window: int | None = None,
    seed: int | Sequence[int] = 0,
    drop_last: bool = False,
    max_length: int | None = None,
    min_completion_tokens: int = 1,
    pad_to_multiple_of: int | None = None,
    oversize: str = "truncate",
    rank: int = 0,
    world_size: int = 1,
) -> list[np.ndarray]:
    """Split an epoch order into batches of pair indices (one rank's share), as the Loader does.

    Args:
        lengths: int64 ``(3, N)`` prompt/chosen/rejected lengths (``Dataset.lengths``), untruncated.
        order: int64 pair indices in epoch order (e.g. :func:`pairpack.batch.sampling.epoch_order`).
        batch_size: pairs per batch (per rank). Exactly one of ``batch_size`` / ``max_tokens``.
            Ranks are equalised on pairs as ``DistributedSampler`` does (``drop_last`` trims the
            tail, else it is padded by repeating the first pairs); ``drop_last`` also drops a
            final short batch.
        max_tokens: per-batch budget on ``2 * B * L`` (both rows, padded length ``L``). Batches are
            split until their count divides ``world_size``, so ranks get equal batch counts
            without repeating or dropping pairs (only with fewer pairs than ranks are batches
            repeated, or dropped with ``drop_last``).
        group_by_length: sort pairs by padded length within windows of ``window`` pairs of the
            (shuffled) order, then shuffle the resulting batches (rank-aligned, so the ranks' batches
            of one step have similar lengths).
        window: grouping window in pairs (default: 512 batches per rank).
        seed: seed of the batch shuffle under grouping (int or sequence, as numpy's ``default_rng``).
        max_length, min_completion_tokens: truncation (see module docstring).
        pad_to_multiple_of: the padded length of a batch rounds up to it (counts toward the budget).
        oversize: a pair over ``max_tokens`` alone: ``"truncate"`` (cap its length), ``"skip"``
            (leave it out), ``"error"`` (raise PairpackError).
        rank, world_size: which share to return.

    Returns:
        list of int64 arrays, one per batch, in iteration order.
    """
    order = np.asarray(order, dtype=np.int64)
    check_options(batch_size=batch_size, max_tokens=max_tokens, max_length=max_length,
                  min_completion_tokens=min_completion_tokens, pad_to_multiple_of=pad_to_multiple_of,
                  oversize=oversize, window=window)
    eff = effective_max_length(max_length, max_tokens, pad_to_multiple_of, oversize)
    over = oversize_mask(lengths, max_tokens, max_length=eff, min_completion_tokens=min_completion_tokens,
                         pad_to_multiple_of=pad_to_multiple_of)
    if over.any():
        if oversize == "error":
            first = int(np.flatnonzero(over)[0])
            raise PairpackError(f"{int(over.sum())} pair(s) exceed max_tokens={max_tokens} alone "
                                f"(first: pair {first}); use oversize='truncate' or 'skip'")
        order = order[~over[order]]
    flat, offsets = plan_rank(lengths, order, batch_size=batch_size, max_tokens=max_tokens,
                              group_by_length=group_by_length, window=window, seed=seed, drop_last=drop_last,
                              max_length=eff, min_completion_tokens=min_completion_tokens,
                              pad_to_multiple_of=pad_to_multiple_of, rank=rank, world_size=world_size)
    return np.split(flat, offsets[1:-1]) if len(offsets) > 1 else []


def _batch_totals(lengths: np.ndarray, batches: Sequence[np.ndarray], max_length: int | None,
                  min_completion_tokens: int, pad_to_multiple_of: int | None) -> tuple[int, int]:
    batches = [np.asarray(b, dtype=np.int64) for b in batches if len(b)]
    if not batches:
        return 0, 0
    flat = np.concatenate(batches)
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    p, c, r = _truncate3(lengths[0, flat], lengths[1, flat], lengths[2, flat], max_length,
                         min_completion_tokens)
    real = int((2 * p + c + r).sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lmax = _round_up(np.maximum.reduceat(p + np.maximum(c, r), starts), pad_to_multiple_of)
    return real, int((2 * sizes * lmax).sum())


def padding_efficiency(lengths: np.ndarray, batches: Sequence[np.ndarray], max_length: int | None = None, *,
                       min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None,
                       max_tokens: int | None = None, oversize: str = "truncate") -> float:
    """Real tokens / padded tokens over ``batches`` (both rows counted), as the Loader assembles them.

    Pass the same ``max_length``/``max_tokens``/``oversize``/``pad_to_multiple_of`` as to
    :func:`plan_batches`: with a token budget and ``oversize="truncate"`` the truncation length is
    :func:`effective_max_length`. Returns 1.0 for no batches.
    """
    eff = effective_max_length(max_length, max_tokens, pad_to_multiple_of, oversize)
    real, padded = _batch_totals(lengths, batches, eff, min_completion_tokens, pad_to_multiple_of)
    return real / padded if padded else 1.0


def padding_ceiling(lengths: np.ndarray, max_length: int | None = None, *, min_completion_tokens: int = 1) -> float:
    """The best padding efficiency possible: ``sum(2P + C + R) / sum(2 (P + max(C, R)))``.

    Both rows of a pair share one padded length, so even a batch of one pair pads the shorter
    completion.
    """
    p, c, r = _truncate3(lengths[0], lengths[1], lengths[2], max_length, min_completion_tokens)
    den = int((2 * (p + np.maximum(c, r))).sum())
    return int((2 * p + c + r).sum()) / den if den else 1.0


# --- plans that touch the dataset ------------------------------------------------------------------
@dataclass
class BatchPlan:
    """Everything needed to assemble one batch, nothing copied yet: the arguments of ``assemble``.

    Attributes:
        tokens: per pair, the 1-D token array (a shard's memory map) its segments live in (``B``).
        prompt_start, prompt_len: int64 ``(B,)``, after truncation.
        completion_start, completion_len: int64 ``(2, B)``, row 0 chosen, row 1 rejected, after truncation.
        indices: int64 ``(B,)`` dataset indices.
        columns: per-pair column values, name -> ``(B,)`` array.
        shards, shard_of, longest: optional shortcuts for :func:`~pairpack.batch.triplets.assemble`
            (the distinct token arrays, each pair's position in them, the longest row), as
            :meth:`Dataset.take <pairpack.read.dataset.Dataset.take>` gives them.
    """

    tokens: list[np.ndarray]
    prompt_start: np.ndarray
    prompt_len: np.ndarray
    completion_start: np.ndarray
    completion_len: np.ndarray
    indices: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    shards: tuple[np.ndarray, ...] | None = None
    shard_of: np.ndarray | None = None
    longest: int | None = None

    def __len__(self) -> int:
        return len(self.prompt_len)

    def args(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The positional arguments of :func:`pairpack.batch.triplets.assemble`."""
        return self.tokens, self.prompt_start, self.prompt_len, self.completion_start, self.completion_len

    def assemble(self, pad_id: int, pad_to_multiple_of: int | None = None) -> "Triplets":
        """The batch as CPU tensors."""
        from .triplets import assemble

        return assemble(*self.args(), pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                        indices=self.indices, columns=self.columns, shards=self.shards, shard_of=self.shard_of,
                        longest=self.longest)


def batch_of(ds: "Dataset", indices: np.ndarray, *, max_length: int | None = None, truncation: str = "keep_end",
             min_completion_tokens: int = 1, columns: Sequence[str] = (),
             pad_to_multiple_of: int | None = None) -> "Triplets":
    """The batch of pairs ``indices`` of ``ds``, truncated to ``max_length``: the C kernels'
    two-call path when no row needs cutting, else :func:`make_plan` then assemble (same bytes)."""
    if _accel.native is not None:
        got = ds._batch_native(_accel.native, indices, pad_to_multiple_of, columns, max_length)
        if got is not None:
            return got
    return make_plan(ds, indices, max_length=max_length, truncation=truncation,
                     min_completion_tokens=min_completion_tokens, columns=columns).assemble(ds.pad_id, pad_to_multiple_of)


def make_plan(ds: "Dataset", indices: np.ndarray, *, max_length: int | None = None, truncation: str = "keep_end",
              min_completion_tokens: int = 1, columns: Sequence[str] = ()) -> BatchPlan:
    """The :class:`BatchPlan` of pairs ``indices`` of ``ds``, truncated to ``max_length`` (vectorised)."""
    t = ds.take(indices, columns)
    st, ln = t.starts, t.lengths
    if max_length is None or (t.longest is not None and t.longest <= max_length):  # nothing to cut
        return BatchPlan(t.tokens, st[fmt.PROMPT], ln[fmt.PROMPT], st[1:], ln[1:], t.indices, t.columns,
                         t.shards, t.shard_of, t.longest)
    ps, cs = st[fmt.PROMPT], st[1:]
    p, c, r = _truncate3(ln[fmt.PROMPT], ln[fmt.CHOSEN], ln[fmt.REJECTED], max_length, min_completion_tokens)
    if truncation == "keep_end":
        ps = ps + (ln[fmt.PROMPT] - p)  # keep the prompt's end: drop tokens from its start
    return BatchPlan(t.tokens, ps, p, cs, np.stack([c, r]), t.indices, t.columns, t.shards, t.shard_of)


def identical_after_truncation(ds: "Dataset", indices: np.ndarray | None = None, *, max_length: int | None,
                               min_completion_tokens: int = 1, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """bool mask over ``indices`` (default: all pairs): chosen == rejected only because of truncation.

    Only pairs whose completions were cut to equal lengths are compared, with one vectorised
    gather per shard and chunk of at most ``chunk_tokens`` tokens; pairs identical in the data
    itself are not flagged (the build reports those).
    """
    lengths = ds.lengths
    idx = np.arange(len(ds), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros(len(idx), dtype=bool)
    if max_length is None or not len(idx):
        return out
    c, r = lengths[fmt.CHOSEN, idx], lengths[fmt.REJECTED, idx]
    _, c2, r2 = _truncate3(lengths[fmt.PROMPT, idx], c, r, max_length, min_completion_tokens)
    cand = np.flatnonzero(((c2 < c) | (r2 < r)) & (c2 == r2))
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
    """A ``collate_fn`` for a plain ``torch.utils.data.DataLoader``: a list of pair indices -> Triplets.

    The index list is vectorised in one piece (truncation, one ``assemble``); use it with any
    sampler over ``range(len(ds))``::

        DataLoader(range(len(ds)), batch_size=32, shuffle=True, collate_fn=Collate(ds, max_length=1024))
        DataLoader(range(len(ds)), sampler=DistributedSampler(range(len(ds))), batch_size=32,
                   collate_fn=Collate(ds), num_workers=2)

    A list of :class:`~pairpack.Pair` (``DataLoader(ds, collate_fn=Collate(ds))``) also works; the
    indices of the result are then -1 (a Pair does not know its index). Pairs whose chosen and
    rejected become identical through truncation are left out and counted in ``self.dropped``
    (per process: each DataLoader worker has its own copy).
    """

    def __init__(self, ds: "Dataset", *, max_length: int | None = None, truncation: str = "keep_end",
                 min_completion_tokens: int = 1, pad_to_multiple_of: int | None = None,
                 columns: Sequence[str] = ()) -> None:
        check_options(batch_size=1, max_tokens=None, max_length=max_length, truncation=truncation,
                      min_completion_tokens=min_completion_tokens, pad_to_multiple_of=pad_to_multiple_of)
        self.ds = ds
        self.max_length, self.truncation = max_length, truncation
        self.min_completion_tokens = min_completion_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.columns = tuple(columns)
        self.dropped = 0

    def __call__(self, items: Sequence[Any]) -> "Triplets":
        if len(items) and isinstance(items[0], Pair):
            return self._from_pairs(items)
        idx = np.asarray(items, dtype=np.int64).reshape(-1)
        same = identical_after_truncation(self.ds, idx, max_length=self.max_length,
                                          min_completion_tokens=self.min_completion_tokens)
        if same.any():
            self.dropped += int(same.sum())
            idx = idx[~same]
        return batch_of(self.ds, idx, max_length=self.max_length, truncation=self.truncation,
                        min_completion_tokens=self.min_completion_tokens, columns=self.columns,
                        pad_to_multiple_of=self.pad_to_multiple_of)

    def _from_pairs(self, pairs: Sequence["Pair"]) -> "Triplets":
        from .triplets import assemble

        if self.columns:
            raise ValueError("columns need pair indices: use DataLoader(range(len(ds)), ...) with Collate")
        ln = np.array([[len(q.prompt), len(q.chosen), len(q.rejected)] for q in pairs], dtype=np.int64).T
        ln = ln.reshape(3, -1)
        p, c, r = _truncate3(ln[0], ln[1], ln[2], self.max_length, self.min_completion_tokens)
        keep = np.ones(len(pairs), dtype=bool)
        if self.max_length is not None:
            cut = ((c < ln[1]) | (r < ln[2])) & (c == r)
            for j in np.flatnonzero(cut).tolist():
                keep[j] = not np.array_equal(pairs[j].chosen[: c[j]], pairs[j].rejected[: r[j]])
            self.dropped += int((~keep).sum())
        # one small joined array per pair (prompt, chosen, rejected): this path copies once more
        # than the index path, which is why Collate prefers indices
        tokens = [np.concatenate(q) for q, k in zip(pairs, keep) if k]
        ln, p, c, r = ln[:, keep], p[keep], c[keep], r[keep]
        ps = np.zeros(len(p), dtype=np.int64)
        if self.truncation == "keep_end" and self.max_length is not None:
            ps = ln[0] - p
        cs = np.stack([ln[0], ln[0] + ln[1]])
        return assemble(tokens, ps, p, cs, np.stack([c, r]), pad_id=self.ds.pad_id,
                        pad_to_multiple_of=self.pad_to_multiple_of, indices=np.full(len(p), -1, dtype=np.int64))
