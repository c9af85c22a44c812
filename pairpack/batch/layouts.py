"""Batches shaped for the model's compute: the ``packed`` and ``prefix_shared`` layouts.

The padded layout (:class:`~pairpack.Triplets`) spends compute on padding and on each prompt
twice. Here pairs are laid out without padding inside rows of a token budget:

* ``packed``: each pair as two sequences ``[prompt][chosen]`` and ``[prompt][rejected]``, placed
  one after the other in a row; positions restart at 0 in each sequence. Exactly what varlen
  attention kernels (flash-attention ``cu_seqlens``) take.
* ``prefix_shared``: each pair as ONE sequence ``[prompt][chosen][rejected]`` (``P + C + R``
  tokens, no token duplicated). Rejected positions continue from ``P`` (as if chosen were
  absent) and rejected tokens never attend to chosen tokens, so every rejected token sees exactly
  the context it has in the padded layout. The first rejected token is predicted by the last
  prompt position, whose logits also predict the first chosen token: the scoring map lists that
  column twice rather than duplicating the last prompt token (the choice of Wang & Hegde 2024's
  alternative), so the row stays ``P + C + R`` long and positions stay those of the padded rows.

Pairs go into rows next-fit in batch order (:func:`pairpack.batch.plan.pack_rows`) under the row
bound (``max_row_tokens``, else the batch budget ``max_tokens``; 0: one pair per row); a pair never
spans two rows. ``T`` (row length) is the longest row rounded up to ``pad_to_multiple_of``; the
budget bounds ``R * T``. The attention rule (both mask builders): query ``q`` may attend key ``k``
iff same row, equal ``sequence_ids >= 0``, ``k <= q``, and not (``q`` rejected and ``k``
chosen); a padding query attends only to itself (no empty softmax row).

Shape legend: ``B`` pairs, ``R`` rows, ``T`` row length, ``S`` sequences, ``N`` scored tokens.
Built in one pass of the C kernel ``_native.layout`` where it is compiled, else vectorised from the
plan's coordinates (one gather per token array, no loop per token): same bytes either way. The
scoring map (which logit predicts which completion token) is not built here: it follows from the
tensors above, and :meth:`PackedBatch.score_map` derives it on the batch's device when first read,
so the host writes and the pinned path copies ``O(R T + B)`` values, not also 33 bytes per scored
token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .. import _accel
from .._accel import native_applies
from ..errors import DeviceError
from ..format.spec import CHOSEN, PROMPT, REJECTED, round_up
from .attention import SplitAttention, split_attention
from .options import PlanOptions
from .packing import pack_rows
from .triplets import TensorBatch, shards_of

if TYPE_CHECKING:
    from .plan import BatchPlan

__all__ = ["PackedBatch", "build", "PROMPT", "CHOSEN", "REJECTED", "PAD"]

PAD = -1
"""The ``token_part`` of padding; ``PROMPT``, ``CHOSEN``, ``REJECTED`` (0, 1, 2) are the segments' rows
in FORMAT.md §4.2."""


@dataclass
class PackedBatch(TensorBatch):
    """One batch of pairs in the ``packed`` or ``prefix_shared`` layout (see the module docstring).

    Attributes:
        layout: ``"packed"`` or ``"prefix_shared"``.
        input_ids: int64 ``(R, T)``; padding holds ``pad_id``.
        position_ids: int64 ``(R, T)``; packed: 0.. in each sequence; prefix_shared: prompt
            ``0..P-1``, chosen ``P..P+C-1``, rejected ``P..P+R-1``; padding 0.
        attention_mask: bool ``(R, T)``, True on real tokens.
        sequence_ids: int32 ``(R, T)``, the sequence (0..S-1, batch-wide) of each token; -1 padding.
            packed: sequence ``2b`` is pair ``b``'s chosen, ``2b + 1`` its rejected; prefix_shared: ``b``.
        token_part: int8 ``(R, T)``: 0 prompt, 1 chosen, 2 rejected, -1 padding.
        cu_seqlens: int32 ``(S + 1,)``, sequence boundaries in ``input_ids[attention_mask]``
            (row-major); ``max_seqlen`` the longest sequence. Exact for ``packed``; for
            ``prefix_shared`` they bound pairs, and the rejected-not-chosen rule needs a mask.
        sequence_pair: int64 ``(S,)`` pair position (0..B-1) of each sequence.
        sequence_side: int8 ``(S,)``: 0 chosen, 1 rejected (packed); -1 both (prefix_shared).
        completion_span: int64 ``(S, 2)``: ``[start, end)`` of the completion tokens within the
            sequence (prefix_shared: chosen and rejected, ``[P, P + C + R)``).
        indices: int64 ``(B,)`` dataset indices; prompt/chosen/rejected_lengths int64 ``(B,)``
            after truncation; columns: per-pair columns, name -> ``(B,)``; source: int64 ``(B,)``
            in a mixture, each pair's source position (see :class:`~pairpack.Triplets`), else None.
        num_scored: ``N``, the completion tokens of the batch (``sum(C + R)``).

    The scoring map (``score_index``, ``score_labels``, ``score_pair``, ``score_side``, see
    :meth:`score_map`) is not carried: it is derived from the tensors above on the batch's device
    the first time it is read, as the padded layout's consumer derives its labels from the masks.
    """

    layout: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    sequence_ids: torch.Tensor
    token_part: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sequence_pair: torch.Tensor
    sequence_side: torch.Tensor
    completion_span: torch.Tensor
    indices: torch.Tensor
    prompt_lengths: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    num_scored: int
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    source: torch.Tensor | None = None
    # the derived scoring map; not a constructor argument, and dropped by to()/pin_memory() (replace)
    _scores: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _split: "SplitAttention | None" = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    # --- the scoring map, derived ------------------------------------------------------------
    def score_map(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score_index, score_labels, score_pair, score_side)``, on the batch's device, computed
        once (vectorised, no host sync) from ``cu_seqlens``, ``attention_mask``, the lengths and
        ``input_ids``:

        * ``score_index`` int64 ``(2, N)``: (row, column) of the logit that predicts each
          completion token: the column before the token, except that in ``prefix_shared`` the first
          rejected token is predicted by the last prompt position;
        * ``score_labels`` int64 ``(N,)``: the token scored there;
        * ``score_pair`` int64 ``(N,)``: its pair position; ``score_side`` int8 ``(N,)``: 0 chosen,
          1 rejected.

        Entries are ordered by (pair, side, token); every completion token appears exactly once.
        """
        if self._scores is None:
            self._scores = _score_map(self)
        return self._scores  # type: ignore[return-value]

    score_index = property(lambda self: self.score_map()[0], doc="int64 ``(2, N)``, see :meth:`score_map`.")
    score_labels = property(lambda self: self.score_map()[1], doc="int64 ``(N,)``, see :meth:`score_map`.")
    score_pair = property(lambda self: self.score_map()[2], doc="int64 ``(N,)``, see :meth:`score_map`.")
    score_side = property(lambda self: self.score_map()[3], doc="int8 ``(N,)``, see :meth:`score_map`.")

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, T)``."""
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def real_tokens(self) -> int:
        """Tokens that are not padding (packed: ``2P + C + R`` per pair; prefix_shared ``P + C + R``)."""
        return int(self.attention_mask.sum())

    def padded_tokens(self) -> int:
        """Token slots the model processes, ``R * T``."""
        r, t = self.shape
        return r * t

    # --- attention masks ---------------------------------------------------------------------
    def dense_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``(R, 1, T, T)``: True (or 1) where query ``q`` may attend key ``k`` (module docstring rule);
        for SDPA's boolean ``attn_mask`` or x-transformers' ``attn_mask``. Costs ``R * T * T`` bytes."""
        seq, part = self.sequence_ids, self.token_part
        t = seq.shape[1]
        ar = torch.arange(t, device=seq.device)
        same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
        causal = ar[None, :] <= ar[:, None]
        rej_on_chosen = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
        pad_self = (seq < 0)[:, :, None] & (ar[:, None] == ar[None, :])
        m = (same & causal & ~rej_on_chosen) | pad_self
        return m[:, None].to(dtype)

    def split_attention(self) -> "SplitAttention":
        """The rule as small dense attentions (each sequence causal alone, and in ``prefix_shared``
        the rejected tokens over ``[prompt][rejected]``): a
        :class:`~pairpack.batch.attention.SplitAttention` whose ``attend(q, k, v)`` a model's
        attention calls instead of SDPA with :meth:`dense_mask`. Costs ``(P+C)**2 + R (P+R)`` score
        entries per pair instead of ``T**2`` per row, on any device. Built once per batch (the
        policy and the reference model share it)."""
        if self._split is None:
            self._split = split_attention(self)
        return self._split

    def mask_mod(self) -> Callable[..., torch.Tensor]:
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the rule (``b`` = row). It reads
        the batch's ``sequence_ids``/``token_part`` on their device."""
        seq, part = self.sequence_ids, self.token_part

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            sq, sk = seq[b, q], seq[b, kv]
            pq, pk = part[b, q], part[b, kv]
            allowed = (sq == sk) & (sq >= 0) & (kv <= q) & ~((pq == REJECTED) & (pk == CHOSEN))
            return allowed | ((sq < 0) & (q == kv))

        return mask_mod

    def block_mask(self, **kwargs: Any) -> Any:
        """A FlexAttention ``BlockMask`` of the rule for ``flex_attention(q, k, v, block_mask=...)``
        (heads broadcast). Needs CUDA and ``torch.nn.attention.flex_attention``; the batch on the
        CUDA device (``batch.to("cuda")``). Raises :class:`~pairpack.errors.DeviceError` otherwise."""
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError as e:
            raise DeviceError(f"block_mask(): torch {torch.__version__} has no FlexAttention "
                              f"(torch.nn.attention.flex_attention: {e}); use dense_mask()") from None
        if not torch.cuda.is_available():
            raise DeviceError("block_mask(): FlexAttention block masks need a CUDA device and none is "
                              "available; use dense_mask() (SDPA / plain attention) on this machine")
        if self.sequence_ids.device.type != "cuda":
            raise DeviceError(f"block_mask(): the batch is on {self.sequence_ids.device}; move it first "
                              f"(batch.to('cuda')) so the mask reads its tensors on the GPU")
        r, t = self.shape
        return create_block_mask(self.mask_mod(), r, None, t, t, device=self.sequence_ids.device, **kwargs)


def build(plan: "BatchPlan", pad_id: int, options: PlanOptions) -> PackedBatch:
    """The :class:`PackedBatch` of ``plan`` (coordinates after truncation) in ``options.layout``.

    Rows come from :func:`pairpack.batch.packing.pack_rows` over the pairs in plan order with
    ``options.row_bound()`` (the planner packed the same way, so a planned batch fits its budget);
    raises :class:`~pairpack.batch.options.OversizeError` for a pair over the row bound.

    With the compiled kernels one C pass (``_native.layout``) writes every array; otherwise
    :func:`_build_numpy`, its twin, gives the same bytes with a handful of whole-array passes.
    """
    b = len(plan)
    i64 = np.int64
    p = np.asarray(plan.prompt_lengths, dtype=i64).reshape(-1)
    cl = np.asarray(plan.completion_lengths, dtype=i64).reshape(2, b)
    rows, t = _rows(p, cl, options)
    nat = _accel.native
    if nat is not None and b:
        shards, shard_of = (plan.shards, plan.shard_of) if plan.shards is not None else shards_of(plan.tokens)
        if native_applies(shards, pad_id):
            return _build_native(nat, shards, shard_of, plan.prompt_starts, p, plan.completion_starts, cl, rows, t,
                                 pad_id, options.layout, plan.indices, plan.columns, fresh=False)
    return _build_numpy(plan, p, cl, rows, t, pad_id, options)


def build_located(nat: Any, shards: tuple[np.ndarray, ...], coords: np.ndarray, pad_id: int, options: PlanOptions,
                  columns: dict[str, np.ndarray] | None) -> PackedBatch:
    """The hot path of ``batch_of`` for packed layouts: the C ``take``'s coordinates (int64
    ``(8, B)``: index, shard, 3 starts, 3 lengths; nothing to truncate) straight into the C layout
    kernel, with no plan in between. The caller checked :func:`~pairpack._accel.native_applies`;
    same batch as :func:`build` of the same pairs. ``coords`` is this batch's own array: the
    batch's ``indices`` and lengths are views of it."""
    p, cl = coords[5], coords[6:8]
    rows, t = _rows(p, cl, options)
    return _build_native(nat, shards, None if len(shards) == 1 else coords[1], coords[2], p, coords[3:5], cl, rows,
                         t, pad_id, options.layout, coords[0], columns, fresh=True)


def _rows(p: np.ndarray, cl: np.ndarray, options: PlanOptions) -> tuple[np.ndarray, int]:
    """(row boundaries, row length ``T``) of pairs with prompt lengths ``p`` and completion lengths
    ``cl`` ``(2, B)`` in ``options.layout``. One row (no row bound, the Loader's usual case) takes
    two sums and no per-pair array: this runs once per batch on the hot path."""
    cap = options.row_bound()
    b = len(p)
    if cap is None:
        total = int(p.sum()) * (1 if options.layout == "prefix_shared" else 2) + int(cl.sum())
        return np.array((0, b), dtype=np.int64), int(round_up(total, options.pad_to_multiple_of))
    need = options.pair_tokens(p, cl[0], cl[1])
    rows = pack_rows(need, cap)
    if len(rows) <= 2:
        longest_row = int(need.sum())
    else:
        csum = np.concatenate([[0], np.cumsum(need)])
        longest_row = int((csum[rows[1:]] - csum[rows[:-1]]).max())
    return rows, int(round_up(longest_row, options.pad_to_multiple_of))


def _build_native(nat: Any, shards: tuple[np.ndarray, ...], shard_of: np.ndarray | None, prompt_starts: np.ndarray,
                  p: np.ndarray, completion_starts: np.ndarray, cl: np.ndarray, rows: np.ndarray, t: int, pad_id: int,
                  layout: str, indices: np.ndarray | None, columns: dict[str, np.ndarray] | None, *,
                  fresh: bool) -> PackedBatch:
    """The batch through the C kernel (the caller checked :func:`~pairpack._accel.native_applies`):
    every output allocated here, written in one pass there. ``fresh``:
    the coordinate arrays are contiguous int64 and belong to this batch (no conversion, no copy)."""
    shared = layout == "prefix_shared"
    b, nrows = len(p), len(rows) - 1
    s = b if shared else 2 * b
    i64, e, asc = np.int64, np.empty, np.ascontiguousarray
    outs = (e((nrows, t), i64), e((nrows, t), i64), e((nrows, t), np.int32), e((nrows, t), np.int8),
            e((nrows, t), np.bool_), e(s + 1, np.int32), e(s, i64), e(s, np.int8), e((s, 2), i64))
    if fresh:
        max_seqlen = nat.layout(shards, shard_of, prompt_starts, p, completion_starts, cl, rows, shared, pad_id, outs)
    else:
        max_seqlen = nat.layout(shards, None if shard_of is None else asc(shard_of, dtype=i64),
                                asc(prompt_starts, dtype=i64), asc(p), asc(completion_starts, dtype=i64).reshape(2, b),
                                asc(cl), rows, shared, pad_id, outs)
    return _batch(layout, outs, max_seqlen, indices, p, cl, columns, copy=not fresh)


def _build_numpy(plan: "BatchPlan", p: np.ndarray, cl: np.ndarray, rows: np.ndarray, t: int, pad_id: int,
                 options: PlanOptions) -> PackedBatch:
    """:func:`build` in numpy (the C kernel's twin). Per token, a handful of whole-array passes: the
    source index and the position are ``repeat(per-segment base, lengths) + arange``; the real
    tokens of the ``(R, T)`` arrays are written in row-major order through one boolean mask (a
    plain slice when the batch is one row)."""
    shared = options.layout == "prefix_shared"
    b = len(p)
    i64 = np.int64
    c, r = cl[0], cl[1]
    ps = np.asarray(plan.prompt_starts, dtype=i64).reshape(-1)
    cs = np.asarray(plan.completion_starts, dtype=i64).reshape(2, b)
    zero = np.zeros(b, dtype=i64)
    # segments, pair-major: shared (prompt, chosen, rejected); packed (prompt, chosen, prompt, rejected)
    if shared:
        k = 3
        src0 = np.stack([ps, cs[0], cs[1]], 1).reshape(-1)
        ln = np.stack([p, c, r], 1).reshape(-1)
        pos0 = np.stack([zero, p, p], 1).reshape(-1)
        seg_seq = np.repeat(np.arange(b, dtype=np.int32), 3)
        seg_part = np.tile(_SHARED_PARTS, b)
        seqlen = p + c + r
    else:
        k = 4
        src0 = np.stack([ps, cs[0], ps, cs[1]], 1).reshape(-1)
        ln = np.stack([p, c, p, r], 1).reshape(-1)
        pos0 = np.stack([zero, p, zero, p], 1).reshape(-1)
        seg_seq = np.repeat(np.arange(2 * b, dtype=np.int32), 2)
        seg_part = np.tile(_PACKED_PARTS, b)
        seqlen = np.stack([p + c, p + r], 1).reshape(-1)
    nrows = len(rows) - 1
    csum = np.concatenate([[0], np.cumsum(options.pair_tokens(p, cl[0], cl[1]))])
    row_len = csum[rows[1:]] - csum[rows[:-1]]
    total = int(csum[-1])

    ends = np.cumsum(ln)
    start = ends - ln  # each segment's first token in the flat real-token order
    ar = np.arange(total, dtype=i64)
    src = np.repeat(src0 - start, ln) + ar
    flat_ids = _gather(plan, src, k, ln).astype(i64, copy=False)  # widened once: masked writes then do not cast
    flat_pos = np.repeat(pos0 - start, ln) + ar

    ids = np.full((nrows, t), pad_id, dtype=i64)
    posn = np.zeros((nrows, t), dtype=i64)
    seq_ids = np.full((nrows, t), -1, dtype=np.int32)
    parts = np.full((nrows, t), PAD, dtype=np.int8)
    if nrows == 1:
        real = (slice(0, 1), slice(0, total))
        am = np.zeros((1, t), dtype=bool)
        am[real] = True
    else:
        am = np.arange(t, dtype=i64)[None, :] < row_len[:, None]
        real = am  # type: ignore[assignment]
    ids[real] = flat_ids
    posn[real] = flat_pos
    seq_ids[real] = np.repeat(seg_seq, ln)
    parts[real] = np.repeat(seg_part, ln)

    cu = np.concatenate([[0], np.cumsum(seqlen)]).astype(np.int32)
    if shared:
        spair, sside, span = np.arange(b, dtype=i64), np.full(b, -1, dtype=np.int8), np.stack([p, seqlen], 1)
    else:
        spair = np.repeat(np.arange(b, dtype=i64), 2)
        sside = np.tile(np.array([0, 1], dtype=np.int8), b)
        span = np.stack([np.repeat(p, 2), seqlen], 1)
    outs = (ids, posn, seq_ids, parts, am, cu, spair, sside, np.ascontiguousarray(span, dtype=i64))
    return _batch(options.layout, outs, int(seqlen.max()) if b else 0, plan.indices, p, cl, plan.columns)


def _batch(layout: str, outs: tuple[np.ndarray, ...], max_seqlen: int, indices: np.ndarray | None, p: np.ndarray,
           cl: np.ndarray, columns: dict[str, np.ndarray] | None, copy: bool = True) -> PackedBatch:
    """The :class:`PackedBatch` of the 9 arrays both builders write (the C kernel's ``outs`` order).
    ``copy=False``: ``indices``, ``p`` and ``cl`` are the batch's own contiguous int64 arrays and
    become tensors without a copy (the hot path: one ``torch.from_numpy`` per tensor and nothing else)."""
    f = torch.from_numpy
    ids, posn, seq_ids, parts, am, cu, spair, sside, span = map(f, outs)
    if copy:
        indices = np.arange(len(p), dtype=np.int64) if indices is None else np.array(indices, dtype=np.int64)
        p, cl = p.copy(), cl.copy()
    return PackedBatch(
        layout=layout, input_ids=ids, position_ids=posn, attention_mask=am, sequence_ids=seq_ids,
        token_part=parts, cu_seqlens=cu, max_seqlen=max_seqlen, sequence_pair=spair, sequence_side=sside,
        completion_span=span, indices=f(indices), prompt_lengths=f(p), chosen_lengths=f(cl[0]),
        rejected_lengths=f(cl[1]), num_scored=int(cl.sum()),
        columns={name: f(np.ascontiguousarray(v)) for name, v in columns.items()} if columns else {})


def _score_map(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`PackedBatch.score_map` of ``batch`` (any object with its fields), vectorised in torch
    on the batch's device. Per completion (slot ``2b + side``): its first token's flat index in
    the real tokens (``input_ids[attention_mask]``, row-major, where ``cu_seqlens`` counts), hence
    its row and column (a completion never spans rows); then one ``repeat_interleave`` spreads the
    per-slot values over its tokens. ``N`` is ``num_scored``, so nothing waits for the device."""
    ids = batch.input_ids
    dev, i64 = ids.device, torch.int64
    b, n = len(batch), int(batch.num_scored)
    p, c, r = (x.to(i64) for x in (batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths))
    start = batch.cu_seqlens.to(i64)[:-1]  # each sequence's first flat index
    shared = batch.layout == "prefix_shared"
    lens = torch.stack([c, r], 1).reshape(-1)  # tokens of slot 2b + side
    # first token of each slot: shared [prompt][chosen][rejected]; packed [prompt][chosen], [prompt][rejected]
    first = torch.stack([start + p, start + p + c], 1).reshape(-1) if shared else start + p.repeat_interleave(2)
    row_len = batch.attention_mask.sum(1, dtype=i64)
    row_end = row_len.cumsum(0)
    row = torch.searchsorted(row_end, first, right=True)
    col = first - (row_end - row_len)[row]  # column of each slot's first token
    ends = lens.cumsum(0)
    slot = torch.arange(2 * b, device=dev)
    per_slot = torch.stack([row, col - (ends - lens), slot // 2, slot % 2], 1)  # (2B, 4): rows copied whole
    row_t, col_t, pair_t, side_t = torch.repeat_interleave(per_slot, lens, dim=0, output_size=n).unbind(1)
    col_t = col_t + torch.arange(n, device=dev)  # column of each scored token
    logit = torch.cat([col_t - 1, col_t.new_zeros(1)])  # the column before it; entry n: a sink
    if shared and b:
        # the first rejected token is predicted by the last prompt position (none written if R = 0)
        at = torch.where(r > 0, (ends - lens)[1::2], n)
        logit.index_put_((at,), col[1::2] - c - 1)
    return torch.stack([row_t, logit[:n]]), ids[row_t, col_t].to(i64), pair_t, side_t.to(torch.int8)


_SHARED_PARTS = np.array([PROMPT, CHOSEN, REJECTED], dtype=np.int8)
_PACKED_PARTS = np.array([PROMPT, CHOSEN, PROMPT, REJECTED], dtype=np.int8)


def _gather(plan: "BatchPlan", src: np.ndarray, k: int, ln: np.ndarray) -> np.ndarray:
    """The tokens at ``src`` (positions in each pair's token array; ``k`` segments of lengths ``ln``
    per pair), one fancy-index gather per token array (shard) the batch touches; storage dtype."""
    tokens = plan.tokens
    if not len(tokens):
        return np.zeros(0, dtype=np.int64)
    if plan.shards is not None:
        shards, shard_of = plan.shards, plan.shard_of
    else:
        shards, shard_of = shards_of(tokens)
    if shard_of is None or len(shards) == 1:
        return shards[0][src]
    out = np.empty(len(src), dtype=shards[0].dtype)
    tok_shard = np.repeat(np.repeat(np.asarray(shard_of), k), ln)
    for s, arr in enumerate(shards):
        sel = tok_shard == s
        if sel.any():
            out[sel] = arr[src[sel]]
    return out
