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
Built vectorised from the plan's coordinates (one gather per token array, no loop per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..errors import DeviceError
from ..format.spec import round_up
from .options import PlanOptions
from .triplets import TensorBatch

if TYPE_CHECKING:
    from .plan import BatchPlan

__all__ = ["PackedBatch", "build", "PROMPT", "CHOSEN", "REJECTED", "PAD"]

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # token_part values


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
        score_index: int64 ``(2, N)``: (row, column) of the logit predicting each completion token.
        score_labels: int64 ``(N,)``: the token scored there.
        score_pair: int64 ``(N,)``: pair position; ``score_side``: int8 ``(N,)``, 0 chosen, 1 rejected.
            Entries are ordered by (pair, side, token); every completion token appears once.
        indices: int64 ``(B,)`` dataset indices; prompt/chosen/rejected_lengths int64 ``(B,)``
            after truncation; columns: per-pair columns, name -> ``(B,)``.
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
    score_index: torch.Tensor
    score_labels: torch.Tensor
    score_pair: torch.Tensor
    score_side: torch.Tensor
    indices: torch.Tensor
    prompt_lengths: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    columns: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

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


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each ``(s, n)`` (int64), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)


def build(plan: "BatchPlan", pad_id: int, options: PlanOptions) -> PackedBatch:
    """The :class:`PackedBatch` of ``plan`` (coordinates after truncation) in ``options.layout``.

    Rows come from :func:`pairpack.batch.plan.pack_rows` over the pairs in plan order with
    ``options.row_bound()`` (the planner packed the same way, so a planned batch fits its budget);
    raises :class:`~pairpack.batch.options.OversizeError` for a pair over the row bound.
    """
    from .plan import pack_rows

    layout = options.layout
    shared = layout == "prefix_shared"
    b = len(plan)
    i64 = np.int64
    p = np.asarray(plan.prompt_lengths, dtype=i64).reshape(-1)
    cl = np.asarray(plan.completion_lengths, dtype=i64).reshape(2, b)
    c, r = cl[0], cl[1]
    ps = np.asarray(plan.prompt_starts, dtype=i64).reshape(-1)
    cs = np.asarray(plan.completion_starts, dtype=i64).reshape(2, b)
    need = (p + c + r) if shared else (2 * p + c + r)
    rows = pack_rows(need, options.row_bound())
    nrows = len(rows) - 1
    csum = np.concatenate([[0], np.cumsum(need)])
    row_of = np.repeat(np.arange(nrows, dtype=i64), np.diff(rows))
    t = int(round_up(int((csum[rows[1:]] - csum[rows[:-1]]).max()) if b else 0, options.pad_to_multiple_of))
    base = row_of * t + (csum[:-1] - csum[rows[:-1]][row_of])  # flat offset of each pair's first token

    # segments, pair-major: packed (prompt, chosen, prompt, rejected); shared (prompt, chosen, rejected)
    k = 3 if shared else 4
    pair_seg = np.repeat(np.arange(b, dtype=i64), k)
    if shared:
        src = np.stack([ps, cs[0], cs[1]], 1)
        ln = np.stack([p, c, r], 1)
        part = np.array([PROMPT, CHOSEN, REJECTED], dtype=np.int8)
        pos0 = np.stack([np.zeros(b, i64), p, p], 1)
        seq = np.repeat(np.arange(b, dtype=np.int32), 3)
    else:
        src = np.stack([ps, cs[0], ps, cs[1]], 1)
        ln = np.stack([p, c, p, r], 1)
        part = np.array([PROMPT, CHOSEN, PROMPT, REJECTED], dtype=np.int8)
        pos0 = np.stack([np.zeros(b, i64), p, np.zeros(b, i64), p], 1)
        seq = (2 * np.arange(b, dtype=np.int32)[:, None] + np.array([0, 0, 1, 1], dtype=np.int32)).reshape(-1)
    ln = ln.reshape(-1)
    dst0 = (base[:, None] + np.concatenate([np.zeros((b, 1), i64), np.cumsum(ln.reshape(b, k), 1)[:, :-1]], 1))
    dst0 = dst0.reshape(-1)
    dst = _ranges(dst0, ln)

    ids = np.full(nrows * t, pad_id, dtype=i64)
    _gather(plan, ids, dst, src.reshape(-1), ln, pair_seg)
    posn = np.zeros(nrows * t, dtype=i64)
    posn[dst] = _ranges(pos0.reshape(-1), ln)
    seq_ids = np.full(nrows * t, -1, dtype=np.int32)
    seq_ids[dst] = np.repeat(seq, ln)
    parts = np.full(nrows * t, PAD, dtype=np.int8)
    parts[dst] = np.repeat(np.tile(part, b), ln)

    # sequences, in row-major order of their tokens (pairs are laid out in order)
    if shared:
        seqlen = p + c + r
        spair = np.arange(b, dtype=i64)
        sside = np.full(b, -1, dtype=np.int8)
        span = np.stack([p, p + c + r], 1)
    else:
        seqlen = np.stack([p + c, p + r], 1).reshape(-1)
        spair = np.repeat(np.arange(b, dtype=i64), 2)
        sside = np.tile(np.array([0, 1], dtype=np.int8), b)
        span = np.stack([np.repeat(p, 2), seqlen], 1)
    cu = np.concatenate([[0], np.cumsum(seqlen)]).astype(np.int32)

    # scoring map: the logit before each completion token; shared rejected starts at the last prompt position
    comp = np.flatnonzero(part != PROMPT)  # segment slots of chosen, rejected within a pair
    cseg = (np.arange(b, dtype=i64)[:, None] * k + comp[None, :]).reshape(-1)  # (2B,) pair-major
    clen = ln[cseg]
    flat_logit = _ranges(dst0[cseg] - 1, clen)
    if shared:  # the first rejected token is predicted by the last prompt position, not the last chosen
        off = np.concatenate([[0], np.cumsum(clen)[:-1]])[1::2]
        has = r > 0
        flat_logit[off[has]] = (dst0[0::3] + p - 1)[has]
    labels = ids[_ranges(dst0[cseg], clen)]
    side = np.tile(np.array([0, 1], dtype=np.int8), b)
    f = torch.from_numpy
    tensors = dict(
        input_ids=f(ids.reshape(nrows, t)), position_ids=f(posn.reshape(nrows, t)),
        attention_mask=f((seq_ids >= 0).reshape(nrows, t)), sequence_ids=f(seq_ids.reshape(nrows, t)),
        token_part=f(parts.reshape(nrows, t)), cu_seqlens=f(cu),
        sequence_pair=f(spair), sequence_side=f(sside), completion_span=f(np.ascontiguousarray(span, dtype=i64)),
        score_index=f(np.stack([flat_logit // max(t, 1), flat_logit % max(t, 1)])), score_labels=f(labels),
        score_pair=f(np.repeat(np.repeat(np.arange(b, dtype=i64), 2), clen)),
        score_side=f(np.repeat(side, clen)),
        indices=f(np.arange(b, dtype=i64) if plan.indices is None else np.asarray(plan.indices, dtype=i64)),
        prompt_lengths=f(p.copy()), chosen_lengths=f(c.copy()), rejected_lengths=f(r.copy()))
    cols = {name: f(np.ascontiguousarray(v)) for name, v in (plan.columns or {}).items()}
    return PackedBatch(layout=layout, max_seqlen=int(seqlen.max()) if b else 0, columns=cols, **tensors)


def _gather(plan: "BatchPlan", out: np.ndarray, dst: np.ndarray, src_start: np.ndarray, ln: np.ndarray,
            pair_seg: np.ndarray) -> None:
    """``out[dst] = tokens[src]`` for the segments ``(src_start, ln)``, one fancy-index gather per
    token array (shard) the batch touches."""
    tokens = plan.tokens
    if not len(tokens):
        return
    src = _ranges(src_start, ln)
    if plan.shards is not None:
        shards, shard_of = plan.shards, plan.shard_of
    else:
        from .triplets import shards_of

        shards, shard_of = shards_of(tokens)
    if shard_of is None or len(shards) == 1:
        out[dst] = shards[0][src]
        return
    tok_shard = np.repeat(np.asarray(shard_of)[pair_seg], ln)
    for s, arr in enumerate(shards):
        sel = tok_shard == s
        if sel.any():
            out[dst[sel]] = arr[src[sel]]
