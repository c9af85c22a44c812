"""Attention over a ``packed`` or ``prefix_shared`` batch by parts: the layout's rule as a few small
dense attentions instead of one ``T x T`` mask per row.

With a dense mask (:meth:`~pairpack.batch.layouts.PackedBatch.dense_mask`) attention computes every
``T x T`` score of a row, masked or not: a ``prefix_shared`` row ``[P][C][R]`` costs ``(P+C+R)**2``
where the padded layout's two rows cost ``2 (P+max(C,R))**2``, more than the prompt saved on the
UltraFeedback-like set. The rule (docs/layouts.md) splits exactly into:

* part A, one causal sequence per sequence of the batch: ``packed``: the sequence itself;
  ``prefix_shared``: the pair's ``[prompt][chosen]`` (chosen tokens see the prompt and earlier
  chosen tokens, nothing else);
* part B (``prefix_shared`` only): the pair's rejected tokens as queries over the keys
  ``[prompt][rejected]``, rejected token ``t`` (0-based) seeing the whole prompt and rejected
  tokens ``0..t``.

Each part is gathered into sequences ``(S, L)`` left-aligned, attended with SDPA (part A with
``is_causal``, which the flash kernels run without a mask and without the upper triangle; part B
with an ``(S, 1, max R, max(P+R))`` mask), and scattered back to the ``(R, T)`` token slots. Part A
costs ``(P+C)**2`` (causal) and part B ``R (P+R)`` per pair: less than the padded rows, and
independent of how many pairs share a row. Padding tokens get a zero output (nothing reads them).

A gather position inside a sequence is the token's position id (positions restart at 0 in each
packed sequence; prefix_shared: prompt ``0..P-1``, chosen ``P..``, rejected ``P..``), so building
the index is a few vectorised scatters; the part sizes cost one host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError
from ..format.spec import CHOSEN, REJECTED  # token_part values: a segment's row (FORMAT.md §4.2)

if TYPE_CHECKING:
    from .layouts import PackedBatch

__all__ = ["SplitAttention", "split_attention"]


@dataclass(frozen=True)
class _Part:
    """One part: ``gather`` int64 ``(S, L)``, the slot (``row * T + column``) of each token of each
    sequence, left-aligned (0 past a sequence's end); ``pick`` int64 ``(n,)``, the entries of
    ``gather.view(-1)`` that are real tokens (derived once here, not in every layer)."""

    gather: Tensor
    pick: Tensor

    def scatter(self, out: Tensor, o: Tensor) -> Tensor:
        """``out`` ``(R*T, H, D)`` with the part's attention output ``o`` ``(S, H, L, D)`` written
        at its real tokens' slots (out of place: differentiable)."""
        s, h, n, d = o.shape
        return out.index_copy(0, self.gather.view(-1)[self.pick], o.transpose(1, 2).reshape(s * n, h, d)[self.pick])


@dataclass(frozen=True)
class SplitAttention:
    """The parts (module docstring) as index tensors; pass it where a model takes an attention mask
    and have its attention call :meth:`attend` (TinyLM does).

    Attributes (``S`` sequences, on the batch's device):
        shape: ``(R, T)`` of the batch.
        a: part A, ``(S, max(P+C))`` (``packed``: ``(S, longest sequence)``).
        b_query, b_key: part B (``prefix_shared``; None for ``packed``): the rejected tokens
            ``(S, max R)`` and ``[prompt][rejected]`` ``(S, max(P+R))``.
        b_mask: bool ``(S, 1, max R, max(P+R))``: True where a rejected query may attend the key; a
            padding query sees the pair's real keys (no empty softmax row).
    """

    shape: tuple[int, int]
    a: _Part
    b_query: _Part | None = None
    b_key: _Part | None = None
    b_mask: Tensor | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention under the layout's rule: ``q``, ``k``, ``v`` ``(R, H, T, D)`` (the batch's rows
        and length) -> ``(R, H, T, D)``, equal to SDPA with the dense mask at every real token
        (padding: zeros). Differentiable in ``q``, ``k``, ``v``."""
        r, h, t, d = q.shape
        if (r, t) != self.shape:
            raise ArgumentError(f"SplitAttention.attend(): q has rows x length {r} x {t}, the batch "
                                f"{self.shape[0]} x {self.shape[1]}")
        qf, kf, vf = (x.transpose(1, 2).reshape(r * t, h, d) for x in (q, k, v))  # token-major slots

        def take(x: Tensor, part: _Part) -> Tensor:  # -> (S, H, L, D)
            return x[part.gather].transpose(1, 2)

        a = self.a
        out = a.scatter(qf.new_zeros(r * t, h, d),
                             F.scaled_dot_product_attention(take(qf, a), take(kf, a), take(vf, a), is_causal=True))
        if self.b_query is not None and self.b_key is not None:
            bq, bk = self.b_query, self.b_key
            out = bq.scatter(out, F.scaled_dot_product_attention(take(qf, bq), take(kf, bk), take(vf, bk),
                                                                 attn_mask=self.b_mask))
        return out.view(r, t, h, d).transpose(1, 2)


def _place(sel: Tensor, seq: Tensor, rank: Tensor, slots: Tensor, n_seq: int) -> _Part:
    """The slots of the selected tokens at ``[sequence, rank]``, ``(n_seq, max rank + 1)``."""
    s, k = seq[sel].long(), rank[sel]
    width = int(k.max()) + 1 if k.numel() else 0
    gather = torch.zeros(n_seq, width, dtype=torch.int64, device=seq.device)
    gather[s, k] = slots[sel]
    return _Part(gather, s * width + k)


def split_attention(batch: "PackedBatch") -> SplitAttention:
    """The :class:`SplitAttention` of a ``packed`` or ``prefix_shared`` batch (vectorised; one
    host sync per part for its width)."""
    seq, part, pos = batch.sequence_ids, batch.token_part, batch.position_ids
    r, t = seq.shape
    dev = seq.device
    n_seq = int(batch.sequence_pair.shape[0])
    slots = torch.arange(r * t, device=dev).view(r, t)
    real = seq >= 0
    if batch.layout != "prefix_shared":
        return SplitAttention((r, t), _place(real, seq, pos, slots, n_seq))
    # prefix_shared: sequence s is pair sequence_pair[s]; its rejected positions run P..P+R-1
    pair = batch.sequence_pair.long()
    plen = batch.prompt_lengths.to(dev)[pair]
    rlen = batch.rejected_lengths.to(dev)[pair]
    own_p = plen[seq.clamp(min=0).long()]  # each token's pair's prompt length
    b_query = _place(real & (part == REJECTED), seq, pos - own_p, slots, n_seq)
    b_key = _place(real & (part != CHOSEN), seq, pos, slots, n_seq)
    tq = torch.arange(b_query.gather.shape[1], device=dev)[None, :, None]
    jk = torch.arange(b_key.gather.shape[1], device=dev)[None, None, :]
    b_mask = (jk <= plen[:, None, None] + tq) & (jk < (plen + rlen)[:, None, None])
    return SplitAttention((r, t), _place(real & (part != REJECTED), seq, pos, slots, n_seq),
                          b_query, b_key, b_mask[:, None])
