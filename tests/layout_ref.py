"""An independent, loop-by-loop reference of the ``packed`` and ``prefix_shared`` layouts
(/work/notes-team/LAYOUTS.md, README "Layouts"), written from the contract, not from
pairpack.batch.layouts: the model-side tests check pairpack's DPO on batches made here as well as on
the real builder's, and the two builders' masks and scoring maps against each other.

Plain Python per token: for tests with a handful of short pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pairpack.batch.triplets import Triplets

Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected


@dataclass
class RefPacked:
    layout: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    sequence_ids: torch.Tensor
    token_part: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    score_index: torch.Tensor
    score_labels: torch.Tensor
    score_pair: torch.Tensor
    score_side: torch.Tensor
    indices: torch.Tensor
    prompt_lengths: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    def dense_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """(R, 1, T, T), True = may attend, by the contract's attention rule, one entry at a time."""
        if self._mask is None:
            self._mask = self._dense_mask()
        return self._mask.to(dtype)

    def _dense_mask(self) -> torch.Tensor:
        r, t = self.input_ids.shape
        m = torch.zeros(r, 1, t, t, dtype=torch.bool)
        sid, part = self.sequence_ids.tolist(), self.token_part.tolist()
        for row in range(r):
            for q in range(t):
                if sid[row][q] < 0:
                    m[row, 0, q, q] = True
                    continue
                for k in range(q + 1):
                    m[row, 0, q, k] = (sid[row][k] == sid[row][q]
                                       and not (part[row][q] == 2 and part[row][k] == 1))
        return m

    @property
    def sequence_pair(self) -> torch.Tensor:
        """Pair of each sequence: packed sequences ``2b, 2b + 1`` are pair ``b``'s, prefix_shared ``b``."""
        s = torch.arange(len(self.cu_seqlens) - 1)
        return s // 2 if self.layout == "packed" else s

    def split_attention(self) -> Any:
        """pairpack's by-parts attention over this batch's tensors (what the model's "auto" takes)."""
        from pairpack.batch.attention import split_attention

        return split_attention(self)  # type: ignore[arg-type]

    def block_mask(self) -> Any:
        raise AssertionError("the reference builder makes no block masks")

    def to(self, device: Any, non_blocking: bool = False) -> "RefPacked":
        return self


def build(pairs: list[Pair], layout: str, *, per_row: int = 1, pad_id: int = 0, pad_extra: int = 0,
          columns: dict[str, torch.Tensor] | None = None) -> RefPacked:
    """A ``packed`` or ``prefix_shared`` batch of ``pairs``: sequences in pair order, ``per_row``
    sequences per row (packed: a pair's two sequences count as two), rows right-padded to the
    longest plus ``pad_extra``."""
    seqs: list[list[tuple[int, int, int]]] = []  # per sequence: (token, position, part)
    scored: list[list[tuple[int, int, int, int]]] = []  # per sequence: (offset, label, pair, side)
    for b, (p, c, r) in enumerate(pairs):
        n = len(p)
        if layout == "packed":
            for side, comp in ((0, c), (1, r)):
                seqs.append([(tok, i, 0) for i, tok in enumerate(p)]
                            + [(tok, n + j, 1 + side) for j, tok in enumerate(comp)])
                scored.append([(n - 1 + j, tok, b, side) for j, tok in enumerate(comp)])
        elif layout == "prefix_shared":
            seqs.append([(tok, i, 0) for i, tok in enumerate(p)] + [(tok, n + j, 1) for j, tok in enumerate(c)]
                        + [(tok, n + j, 2) for j, tok in enumerate(r)])
            sc = [(n - 1 + j, tok, b, 0) for j, tok in enumerate(c)]
            # the first rejected token is predicted at the last prompt position, the next ones at
            # the rejected token before them (which sits after the chosen block)
            sc += [((n - 1) if j == 0 else (n + len(c) + j - 1), tok, b, 1) for j, tok in enumerate(r)]
            scored.append(sc)
        else:
            raise ValueError(layout)
    groups = [list(range(i, min(i + per_row, len(seqs)))) for i in range(0, len(seqs), per_row)]
    t = max(sum(len(seqs[s]) for s in g) for g in groups) + pad_extra
    R = len(groups)
    ids = torch.full((R, t), pad_id, dtype=torch.long)
    pos = torch.zeros(R, t, dtype=torch.long)
    real = torch.zeros(R, t, dtype=torch.bool)
    sid = torch.full((R, t), -1, dtype=torch.int32)
    part = torch.full((R, t), -1, dtype=torch.int8)
    index, labels, spair, sside = [], [], [], []
    lengths = []
    for row, g in enumerate(groups):
        o = 0
        for s in g:
            for k, (tok, ps, pt) in enumerate(seqs[s]):
                ids[row, o + k], pos[row, o + k], part[row, o + k] = tok, ps, pt
                real[row, o + k], sid[row, o + k] = True, s
            for off, lab, b, side in scored[s]:
                index.append((row, o + off))
                labels.append(lab)
                spair.append(b)
                sside.append(side)
            o += len(seqs[s])
            lengths.append(len(seqs[s]))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    i64 = torch.long
    return RefPacked(layout, ids, pos, real, sid, part, cu, max(lengths),
                     torch.tensor(index, dtype=i64).T.contiguous(), torch.tensor(labels, dtype=i64),
                     torch.tensor(spair, dtype=i64), torch.tensor(sside, dtype=torch.int8),
                     torch.arange(len(pairs)), torch.tensor([len(p) for p, _, _ in pairs]),
                     torch.tensor([len(c) for _, c, _ in pairs]), torch.tensor([len(r) for _, _, r in pairs]),
                     dict(columns or {}))


def triplets(pairs: list[Pair], *, pad_id: int = 0, columns: dict[str, torch.Tensor] | None = None) -> Triplets:
    """The padded layout of ``pairs``."""
    n = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    b = len(pairs)
    seqs = [torch.full((b, n), pad_id, dtype=torch.long) for _ in range(2)]
    masks = [torch.zeros(b, n, dtype=torch.bool) for _ in range(3)]
    for i, (p, c, r) in enumerate(pairs):
        seqs[0][i, : len(p) + len(c)] = torch.tensor(p + c)
        seqs[1][i, : len(p) + len(r)] = torch.tensor(p + r)
        masks[0][i, : len(p)] = True
        masks[1][i, : len(p) + len(c)] = True
        masks[2][i, : len(p) + len(r)] = True
    lens = [torch.tensor([len(x[k]) for x in pairs]) for k in range(3)]
    return Triplets(seqs[0], seqs[1], *masks, torch.arange(b), *lens, dict(columns or {}))
