"""The batch type handed to training code, and its vectorised assembly.

Shape legend: ``B`` pairs in the batch, ``L`` padded length (the longest of the 2B rows, rounded
up to ``pad_to_multiple_of``), ``P`` prompt tokens, ``C``/``R`` chosen/rejected tokens.

Row ``b`` of ``preferred_seq`` is ``prompt_b + chosen_b`` followed by ``pad_id``; row ``b`` of
``unpreferred_seq`` is ``prompt_b + rejected_b`` followed by ``pad_id``. The prompt occupies
positions ``[0, P_b)`` of both rows. Masks come from stored lengths, never from comparing ids
with ``pad_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np
import torch

from .. import _accel
from .._accel import native_applies
from ..format.spec import round_up

__all__ = ["Triplets", "TensorBatch", "assemble"]


class TensorBatch:
    """What every batch type shares: moving and pinning its tensors (dataclass fields that are
    tensors, plus the ``columns`` dict)."""

    columns: dict[str, torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch (columns included)."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)] + \
            list(self.columns.values())

    def _map(self, fn: Any) -> Any:
        kw = {f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return replace(self, **kw, columns={k: fn(v) for k, v in self.columns.items()})

    def to(self, device: Any, *, non_blocking: bool = False) -> Any:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Any:
        """A copy in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())


@dataclass
class Triplets(TensorBatch):
    """One batch of preference pairs, exactly the inputs of ``x_transformers.dpo.DPO.forward``.

    Attributes:
        preferred_seq: int64 ``(B, L)``, prompt + chosen, right-padded with ``pad_id``.
        unpreferred_seq: int64 ``(B, L)``, prompt + rejected, right-padded with ``pad_id``.
        prompt_mask: bool ``(B, L)``, True on positions ``[0, P_b)``.
        preferred_seq_mask: bool ``(B, L)``, True on positions ``[0, P_b + C_b)`` (real tokens).
        unpreferred_seq_mask: bool ``(B, L)``, True on positions ``[0, P_b + R_b)``.
        indices: int64 ``(B,)``, the dataset index of each pair.
        prompt_lengths, chosen_lengths, rejected_lengths: int64 ``(B,)``: P, C, R after any
            truncation.
        columns: per-pair columns requested from the dataset, name -> tensor ``(B,)``.
        source: int64 ``(B,)`` or None: in a mixture (:class:`~pairpack.Loader` given several
            datasets), the position of each pair's source in ``loader.names``; ``indices`` are
            then positions within that source.
    """

    preferred_seq: torch.Tensor
    unpreferred_seq: torch.Tensor
    prompt_mask: torch.Tensor
    preferred_seq_mask: torch.Tensor
    unpreferred_seq_mask: torch.Tensor
    indices: torch.Tensor
    prompt_lengths: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    source: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.preferred_seq.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, L)``."""
        return tuple(self.preferred_seq.shape)  # type: ignore[return-value]

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The five keyword arguments of ``DPO.forward``: ``dpo(**batch.as_kwargs())``."""
        return {
            "preferred_seq": self.preferred_seq,
            "unpreferred_seq": self.unpreferred_seq,
            "prompt_mask": self.prompt_mask,
            "preferred_seq_mask": self.preferred_seq_mask,
            "unpreferred_seq_mask": self.unpreferred_seq_mask,
        }

    def real_tokens(self) -> int:
        """Number of non-pad tokens in both rows (2P + C + R summed over the batch)."""
        return int((2 * self.prompt_lengths + self.chosen_lengths + self.rejected_lengths).sum())

    def padded_tokens(self) -> int:
        """Number of token slots in both rows, ``2 * B * L``."""
        b, n = self.shape
        return 2 * b * n


_ALT = np.tile(np.array([True, False]), 64)


def _alternating(k: int) -> np.ndarray:
    """``[True, False] * k`` (a view of a cached array, grown when needed)."""
    global _ALT
    if 2 * k > len(_ALT):
        _ALT = np.tile(np.array([True, False]), 2 * k)
    return _ALT[: 2 * k]


def _views(tokens: Sequence[np.ndarray], shared: np.ndarray | None, start: np.ndarray,
           end: np.ndarray) -> list[np.ndarray]:
    """``tokens[i][start[i]:end[i]]`` for each pair: views, built by C-level ``map`` when all pairs
    share one token array ``shared`` (one shard), which halves the Python cost of the slicing."""
    if shared is not None:
        return list(map(shared.__getitem__, map(slice, start.tolist(), end.tolist())))
    return [t[a:e] for t, a, e in zip(tokens, start.tolist(), end.tolist())]


def assemble(
    tokens: Sequence[np.ndarray],
    prompt_starts: np.ndarray,
    prompt_lengths: np.ndarray,
    completion_starts: np.ndarray,
    completion_lengths: np.ndarray,
    *,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    indices: np.ndarray | None = None,
    columns: dict[str, np.ndarray] | None = None,
    shards: tuple[np.ndarray, ...] | None = None,
    shard_of: np.ndarray | None = None,
    longest: int | None = None,
) -> Triplets:
    """Build a :class:`Triplets` from segment coordinates that are already bounds-checked.

    Args:
        tokens: per pair, the 1-D token array (a shard's memory map) its segments live in; ``B``
            entries (the same object repeated for pairs of one shard).
        prompt_starts, prompt_lengths: int64 ``(B,)``.
        completion_starts, completion_lengths: int64 ``(2, B)``: row 0 chosen, row 1 rejected.
        pad_id: the id written at padded positions.
        pad_to_multiple_of: round ``L`` up to a multiple of this.
        indices, columns: carried into the result.
        shards, shard_of: optional, the distinct token arrays and int64 ``(B,)`` positions in
            them (``shard_of`` None: one array), equivalent to ``tokens``; saves deriving them.
        longest: optional, ``max(P + C, P + R)`` over the batch when the caller knows it.

    With the compiled kernel (``pairpack._native``, see ``pairpack._accel``) one C pass writes
    the int64 rows and the masks, the GIL released; the numpy path below gives the same bytes.

    The memory-map slices of each row (prompt, completion, padding; a prompt stored right before
    its completion is one slice) are joined in output order by one ``np.concatenate`` straight
    into the int64 output (widening as it copies); the three masks are runs of True then False
    written by one ``np.repeat``. It moves only the output bytes, where a vectorised index gather
    (``tokens[src]``) first builds a ``(2B, L)`` int64 index as large as the output, and a boolean
    scatter into a pad-filled buffer writes every real position twice.
    """
    b = len(prompt_lengths)
    nat = _accel.native
    if nat is not None and b:
        got = _assemble_native(nat, tokens, prompt_starts, prompt_lengths, completion_starts, completion_lengths, pad_id,
                               pad_to_multiple_of, indices, columns, shards, shard_of, longest)
        if got is not None:
            return got
    total = prompt_lengths[None, :] + completion_lengths  # (2, B)
    n = round_up(int(total.max()) if b else 0, pad_to_multiple_of)
    # an empty batch has no token array to take the dtype from; uint32 holds every valid pad_id
    dtype = tokens[0].dtype if b else np.dtype(np.uint32)
    pad = np.full(n, pad_id, dtype=dtype)
    # one token array for the whole batch (one shard) allows the C-level slicing path
    shared = tokens[0] if b and len(set(map(id, tokens))) == 1 else None
    pe = prompt_starts + prompt_lengths
    ce = completion_starts + completion_lengths
    pads = pad.__getitem__
    prompts: list[np.ndarray] | None = None
    pieces: list[Any] = []
    for side in (0, 1):
        npad = map(slice, (n - total[side]).tolist())
        if (completion_starts[side] == pe).all():
            # the writer stores a new prompt right before its chosen completion: one slice per row
            row: list[Any] = [None] * (2 * b)
            row[0::2] = _views(tokens, shared, prompt_starts, ce[side])
            row[1::2] = map(pads, npad)
        else:
            if prompts is None:  # one view per prompt, shared by both rows
                prompts = _views(tokens, shared, prompt_starts, pe)
            row = [None] * (3 * b)
            row[0::3] = prompts
            row[1::3] = _views(tokens, shared, completion_starts[side], ce[side])
            row[2::3] = map(pads, npad)
        pieces += row
    # joined in output order straight into int64: one pass over the output bytes (about 10%
    # faster than a uint16 join followed by a widening cast in tools/bench_reader.py)
    flat = np.empty(2 * b * n, dtype=np.int64)
    if pieces:
        np.concatenate(pieces, out=flat)
    # the three masks as runs of True then False, written by one np.repeat: each mask row is a
    # prefix, so this writes every byte once (measured 3x faster than an arange comparison)
    bounds = np.concatenate([prompt_lengths[None, :], total]).reshape(-1)  # (3B,): P, P + C, P + R
    runs = np.empty((3 * b, 2), dtype=np.int64)
    runs[:, 0] = bounds
    runs[:, 1] = n - bounds
    masks = np.repeat(_alternating(3 * b), runs.reshape(-1)).reshape(3, b, n)
    return wrap(flat.reshape(2, b, n), masks, np.arange(b) if indices is None else indices,
                np.ascontiguousarray(prompt_lengths, dtype=np.int64), np.ascontiguousarray(completion_lengths, dtype=np.int64),
                columns)


def wrap(seqs: np.ndarray, masks: np.ndarray, indices: np.ndarray, prompt_lengths: np.ndarray,
         completion_lengths: np.ndarray, columns: dict[str, np.ndarray] | None) -> Triplets:
    """A :class:`Triplets` of zero-copy tensor views: ``seqs`` int64 ``(2, B, L)``, ``masks`` bool
    ``(3, B, L)``, ``indices`` and ``prompt_lengths`` int64 ``(B,)``, ``completion_lengths`` int64
    ``(2, B)``. One ``torch.from_numpy`` per numpy row view: cheaper than a tensor per stack plus
    ``unbind`` (about 6 us a batch)."""
    f = torch.from_numpy
    return Triplets(f(seqs[0]), f(seqs[1]), f(masks[0]), f(masks[1]), f(masks[2]),
                    f(np.asarray(indices, dtype=np.int64)), f(prompt_lengths), f(completion_lengths[0]),
                    f(completion_lengths[1]),
                    {k: f(np.ascontiguousarray(v)) for k, v in columns.items()} if columns else {})


def write_native(nat: Any, shards: tuple[np.ndarray, ...], shard_of: np.ndarray | None, prompt_starts: np.ndarray,
                 prompt_lengths: np.ndarray, completion_starts: np.ndarray, completion_lengths: np.ndarray, n: int,
                 pad_id: int, out: np.ndarray, masks: np.ndarray | None) -> None:
    """Rows (int64, into ``out`` ``(2, B, n)``) and masks (into ``masks`` ``(3, B, n)`` or None)
    by the C kernel; the caller checked :func:`~pairpack._accel.native_applies`."""
    i64 = np.int64
    nat.assemble(shards, None if shard_of is None else np.ascontiguousarray(shard_of, dtype=i64),
                 np.ascontiguousarray(prompt_starts, dtype=i64), np.ascontiguousarray(prompt_lengths, dtype=i64),
                 np.ascontiguousarray(completion_starts, dtype=i64).reshape(2, -1),
                 np.ascontiguousarray(completion_lengths, dtype=i64).reshape(2, -1), n, pad_id, out, masks)


def shards_of(tokens: Sequence[np.ndarray]) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """The distinct token arrays of a per-pair list and each pair's position in them (int64
    ``(B,)``; None when all pairs share the first array), as the C kernel takes them."""
    first = tokens[0]
    if len(set(map(id, tokens))) == 1:
        return (first,), None
    pos: dict[int, int] = {}
    uniq: list[np.ndarray] = []
    for t in tokens:  # per pair, only for batches that span several token arrays
        if id(t) not in pos:
            pos[id(t)] = len(uniq)
            uniq.append(t)
    return tuple(uniq), np.fromiter((pos[id(t)] for t in tokens), dtype=np.int64, count=len(tokens))


def _assemble_native(nat: Any, tokens: Sequence[np.ndarray], prompt_starts: np.ndarray, prompt_lengths: np.ndarray,
                     completion_starts: np.ndarray, completion_lengths: np.ndarray, pad_id: int,
                     pad_to_multiple_of: int | None, indices: np.ndarray | None,
                     columns: dict[str, np.ndarray] | None, shards: tuple[np.ndarray, ...] | None,
                     shard_of: np.ndarray | None, longest: int | None) -> Triplets | None:
    """:func:`assemble` through the C kernel; None where it does not apply (other dtypes, mixed
    dtypes, a pad_id the dtype cannot hold: the numpy path then gives the result or the error)."""
    b = len(prompt_lengths)
    if shards is None:
        shards, shard_of = shards_of(tokens)
    if not native_applies(shards, pad_id):
        return None
    pl = np.ascontiguousarray(prompt_lengths, dtype=np.int64)
    cl = np.ascontiguousarray(completion_lengths, dtype=np.int64)
    n = round_up(int((pl + cl).max()) if longest is None else longest, pad_to_multiple_of)
    seqs = np.empty((2, b, n), dtype=np.int64)
    masks = np.empty((3, b, n), dtype=np.bool_)
    write_native(nat, shards, shard_of, prompt_starts, pl, completion_starts, cl, n, pad_id, seqs, masks)
    return wrap(seqs, masks, np.arange(b) if indices is None else indices, pl, cl, columns)
