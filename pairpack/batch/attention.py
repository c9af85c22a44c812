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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError
from ..format.spec import CHOSEN, REJECTED  # token_part values: a segment's row (FORMAT.md §4.2)

if TYPE_CHECKING:
    from .layouts import PackedBatch

__all__ = ["SplitAttention", "split_attention"]


class _Take(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward writes only the rows that carry gradient:
    ``grad_x[dst] = grad_y[src]`` (``dst`` distinct). On the CPU ``index_select``'s own backward is a
    ``scatter_add`` over every index (about as slow as both attentions together, measured); here the
    duplicates of ``index`` (padding) carry no gradient, so a plain copy is exact."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        ctx.save_for_backward(src, dst)
        ctx.rows = x.shape[0]
        return x[index]  # advanced indexing: faster than index_select on the CPU for (n, H, D) rows

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        src, dst = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        out[dst] = grad[src]
        return out, None, None, None


@dataclass(frozen=True)
class _Part:
    """One part: ``gather`` int64 ``(S, L)``, the slot (``row * T + column``) of each token of each
    sequence, left-aligned (0 past a sequence's end); ``pick`` int64 ``(n,)``, the entries of
    ``gather.view(-1)`` that are real tokens; ``slots`` int64 ``(n,)``, their slots (derived once
    here, not in every layer)."""

    gather: Tensor
    pick: Tensor
    slots: Tensor

    def take(self, x: Tensor) -> Tensor:
        """The part's tokens of ``x`` ``(R*T, H, D)`` (token-major slots) as ``(S, H, L, D)``. Only
        real tokens get gradient: a padding entry's output is never read (queries) or is masked
        out (keys and values: causal order, or ``b_mask``)."""
        s, n = self.gather.shape
        y = _Take.apply(x, self.gather.view(-1), self.pick, self.slots)
        return y.view(s, n, *x.shape[1:]).transpose(1, 2)

    def real(self, o: Tensor) -> Tensor:
        """The part's attention output ``o`` ``(S, H, L, D)`` at its real tokens, ``(n, H, D)``."""
        s, h, n, d = o.shape
        every = torch.arange(self.pick.numel(), device=o.device)
        return _Take.apply(o.transpose(1, 2).reshape(s * n, h, d), self.pick, every, self.pick)


@dataclass(frozen=True)
class SplitAttention:
    """The parts (module docstring) as index tensors; pass it where a model takes an attention mask
    and have its attention call :meth:`attend` (TinyLM and pairpack's Hugging Face attention do).

    Attributes (``S`` sequences, on the batch's device):
        shape: ``(R, T)`` of the batch.
        a: part A, ``(S, max(P+C))`` (``packed``: ``(S, longest sequence)``).
        b_query, b_key: part B (``prefix_shared``; None for ``packed``): the rejected tokens
            ``(S, max R)`` and ``[prompt][rejected]`` ``(S, max(P+R))``.
        b_mask: bool ``(S, 1, max R, max(P+R))``: True where a rejected query may attend the key; a
            padding query sees the pair's real keys (no empty softmax row).
        place: int64 ``(R*T,)``: where each slot's output is in ``[A's real tokens; B's real
            tokens; one zero row]`` (padding: the zero row). The parts' queries cover every real
            token exactly once, so the output is one gather, not a zero fill and a scatter per part.
        covered: int64 ``(n,)``: the slots of the real tokens in that order (``place[covered]`` is
            ``0..n-1``).
    """

    shape: tuple[int, int]
    a: _Part
    b_query: _Part | None = None
    b_key: _Part | None = None
    b_mask: Tensor | None = None
    place: Tensor | None = None
    covered: Tensor | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               dropout_p: float = 0.0) -> Tensor:
        """Attention under the layout's rule: ``q``, ``k``, ``v`` ``(R, H, T, D)`` (the batch's rows
        and length) -> ``(R, H, T, D)``, equal to SDPA with the dense mask at every real token
        (padding: zeros). Differentiable in ``q``, ``k``, ``v``. ``scale`` (default ``1/sqrt(D)``)
        and ``dropout_p`` are SDPA's."""
        r, h, t, d = q.shape
        if (r, t) != self.shape:
            raise ArgumentError(f"SplitAttention.attend(): q has rows x length {r} x {t}, the batch "
                                f"{self.shape[0]} x {self.shape[1]}")
        # token-major slots; free when q/k/v are transposed views of (R, T, H, D) projections
        qf, kf, vf = (x.transpose(1, 2).reshape(r * t, h, d) for x in (q, k, v))
        kw = {"scale": scale, "dropout_p": dropout_p}
        a = self.a
        parts = [a.real(F.scaled_dot_product_attention(a.take(qf), a.take(kf), a.take(vf), is_causal=True, **kw))]
        if self.b_query is not None and self.b_key is not None:
            bq, bk = self.b_query, self.b_key
            parts.append(bq.real(F.scaled_dot_product_attention(bq.take(qf), bk.take(kf), bk.take(vf),
                                                                attn_mask=self.b_mask, **kw)))
        parts.append(qf.new_zeros(1, h, d))
        assert self.place is not None and self.covered is not None  # set by split_attention()
        every = torch.arange(self.covered.numel(), device=q.device)
        out = _Take.apply(torch.cat(parts), self.place, self.covered, every)
        return out.view(r, t, h, d).transpose(1, 2)


def _place(sel: Tensor, seq: Tensor, rank: Tensor, slots: Tensor, n_seq: int) -> _Part:
    """The slots of the selected tokens at ``[sequence, rank]``, ``(n_seq, max rank + 1)``."""
    s, k = seq[sel].long(), rank[sel]
    width = int(k.max()) + 1 if k.numel() else 0
    gather = torch.zeros(n_seq, width, dtype=torch.int64, device=seq.device)
    gather[s, k] = slots[sel]
    return _Part(gather, s * width + k, slots[sel])


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
        a = _place(real, seq, pos, slots, n_seq)
        return SplitAttention((r, t), a, **_places(r * t, a))
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
    a = _place(real & (part != REJECTED), seq, pos, slots, n_seq)
    return SplitAttention((r, t), a, b_query, b_key, b_mask[:, None], **_places(r * t, a, b_query))


def _places(slots: int, *queries: _Part) -> dict[str, Tensor]:
    """:attr:`SplitAttention.place` and ``covered``: the position of each slot's output in the parts'
    real outputs concatenated in order, then one zero row for every slot no part covers (padding)."""
    covered = torch.cat([q.slots for q in queries])
    total = int(covered.numel())
    place = torch.full((slots,), total, dtype=torch.int64, device=covered.device)
    place[covered] = torch.arange(total, device=covered.device)
    return {"place": place, "covered": covered}
