"""Device feeding: gather batches straight into reusable pinned buffers and copy them asynchronously.

The usual path copies every batch three times (collate into pageable memory, copy into pinned
memory, DMA to the GPU). pairpack knows each batch's exact size from its plan before touching a
token, so :class:`DeviceFeeder` gathers the tokens from the memory maps directly into a page-locked
buffer, issues one ``non_blocking`` copy on its own CUDA stream, and (except in the host-widened
mode) builds the padded int64 rows and the three masks on the GPU. One host copy, one DMA, no
stall of the training stream.

Three transfer modes:

* **compact**: the host writes only the stored tokens, unpadded and in the storage dtype
  (uint16/uint32), each prompt once (it is the same in both rows), plus per-row lengths and source
  offsets. The GPU expands them with one gather into the padded int64 rows. The host touches and
  the link carries only real bytes: for uint16 data at most a quarter of the padded int64 output,
  less again with padding and shared prompts.
* **padded** (``compact=False``): the host writes the padded rows in the storage dtype, the GPU
  widens them to int64 and builds the masks from the lengths.
* **host-widened** (default; ``compact=False, host_widen=True``): the host writes the finished batch, int64
  rows and bool masks (one pass of the C kernel, ``pairpack/_native.c``, when it is built), and
  the device receives it in one copy: every tensor handed out is a view of that copy, no kernel
  runs, one ``record_stream`` per batch. It moves the most bytes (the usual path's) but makes the
  fewest CUDA calls. It is the default: on the machines measured a CUDA call's host cost, not the
  link, was the limit. Compact moves the fewest bytes and is the choice where the link is the
  limit. ``python tools/gpu_check.py`` measures all three against the usual collate +
  ``pin_memory()`` + ``.to()`` path; docs/gpu.md has the figures.

Packed layouts (``layout="packed"``/``"prefix_shared"``, :mod:`pairpack.batch.layouts`): the
host builds the :class:`~pairpack.batch.layouts.PackedBatch` and writes its tensors, at aligned
offsets, into the slot's pinned buffer; one copy carries it and every tensor handed out is a
view of that copy (as host-widened; the transfer mode options apply to the padded layout only).

Ring and stream discipline (CUDA):

* ``prefetch`` slots, each a pinned byte buffer allocated once and grown (to a power of two) only
  when a batch needs more; slots are used round robin.
* Before the host writes into a slot it waits on that slot's copy-done event (host waits on one
  event, never on the device); that copy finished long ago unless more than ``prefetch`` copies
  are in flight.
* The copy runs on the feeder's copy stream (the copy engine works while a training kernel holds
  every SM), the expansion on its high-priority expansion stream after a device-side wait on the
  copy's event (its few small kernels are scheduled as soon as an SM frees up). ``get()``
  makes the caller's current stream wait on the batch's ready event (a device-side wait, the host
  does not block) and calls ``record_stream`` on every returned tensor, so the caching allocator
  does not hand their memory to the feeder's stream while the training stream may still use them.
  Returned tensors never alias a ring buffer: they stay valid as long as the caller holds them.

Workers: with ``num_workers > 0`` the Loader's worker processes produce **index plans** (pair
indices and segment coordinates, a few int64 arrays per batch), and the main process turns each
into a :class:`~pairpack.batch.plan.BatchPlan` over its own memory maps and gathers it into its pinned
buffers. Not pinned batches, because (1) page-locked memory belongs to the main process's CUDA
context: a worker cannot allocate it without initialising CUDA in a forked child (unsupported), and
its batch would reach the main process through shared memory, i.e. one more host copy, which is
exactly the copy this module removes; (2) a plan is a few hundred bytes to pickle while a batch is
megabytes (a plan must not carry the memory maps themselves: a ``np.memmap`` pickles as its whole
contents); (3) the gather is a memory-speed copy out of the page cache, about 0.1 ms per batch of
32 x 2k tokens on one core, so the workers' value is the planning, not the copy.

CPU (``device="cpu"`` or None) runs the same code (ring, layout, host gather, the same expansion
function) with ordinary buffers, a clone in place of the DMA and no streams or events, so the CPU
tests exercise every line except the CUDA calls. A CUDA device on a machine without CUDA raises
:class:`~pairpack.errors.DeviceError`. The feeder is not thread-safe: one thread submits and gets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .. import _accel
from .._accel import native_applies
from ..errors import ArgumentError, DeviceError
from ..format.spec import round_up
from .options import PlanOptions
from .triplets import Triplets, shards_of, write_native

if TYPE_CHECKING:
    from .layouts import PackedBatch
    from .plan import BatchPlan

__all__ = ["DeviceFeeder"]

ALIGN = 64  # byte alignment of every section of a staging buffer (device views need >= 8)
MIN_BUFFER = 1 << 16  # smallest ring buffer, bytes
META_PADDED = 6  # int64 rows of metadata: P, C, R, index, P + C, P + R
META_COMPACT = 9  # ... plus the compact gather's source offsets: prompt, chosen - P, rejected - P

# storage dtype -> (device view dtype, mask restoring the unsigned value after a sign-extending
# widen). uint16/uint32 are read through int16/int32 views: torch supports every op on those, while
# its own uint16/uint32 dtypes have only limited support; `& mask` makes the widening exact.
_TOKEN_VIEWS: dict[np.dtype, tuple[torch.dtype, int | None]] = {
    np.dtype(np.uint8): (torch.uint8, None),
    np.dtype(np.int8): (torch.int8, None),
    np.dtype(np.uint16): (torch.int16, 0xFFFF),
    np.dtype(np.int16): (torch.int16, None),
    np.dtype(np.uint32): (torch.int32, 0xFFFFFFFF),
    np.dtype(np.int32): (torch.int32, None),
    np.dtype(np.int64): (torch.int64, None),
}


class _PlanLike(Protocol):
    """What the feeder reads from a plan (:class:`pairpack.batch.plan.BatchPlan` satisfies it)."""

    tokens: Sequence[np.ndarray]
    prompt_starts: np.ndarray
    prompt_lengths: np.ndarray
    completion_starts: np.ndarray
    completion_lengths: np.ndarray
    indices: np.ndarray | None
    columns: dict[str, np.ndarray] | None


def _align(n: int) -> int:
    return round_up(n, ALIGN)


# --- host side: layout and gather --------------------------------------------------------------
@dataclass(frozen=True)
class HostLayout:
    """Where each part of one batch lives in a staging byte buffer (host and device alike).

    Attributes:
        compact: True for the compact stream, False for padded rows.
        batch: ``B``; length: ``L`` (padded, rounded up to ``pad_to_multiple_of``).
        total: compact only: stored tokens in the stream (sum of P, C and R); the stream holds one
            ``pad_id`` after them at index ``total``, which padded positions gather.
        meta_rows: int64 rows of ``(B,)`` metadata at offset 0 (see ``META_*``).
        tok_off, tok_count, tok_dtype: the token section (offset in bytes, elements, numpy dtype
            as written by the host: the storage dtype, or int64 for the ``host_widen`` variant).
        columns: ``(name, offset, numpy dtype, shape)`` per carried column.
        nbytes: bytes used, the size of the one host-to-device copy.
        mask_off: the ``host_widen`` variant only (else -1): offset of the three bool masks
            ``(3, B, L)``, written by the host, so the device runs no kernel at all.
    """

    compact: bool
    batch: int
    length: int
    total: int
    meta_rows: int
    tok_off: int
    tok_count: int
    tok_dtype: np.dtype
    columns: tuple[tuple[str, int, np.dtype, tuple[int, ...]], ...]
    nbytes: int
    mask_off: int = -1


def _lengths(plan: _PlanLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.ascontiguousarray(plan.prompt_lengths, dtype=np.int64)
    c = np.ascontiguousarray(plan.completion_lengths, dtype=np.int64).reshape(2, len(p))
    return p, c


def layout_for(plan: _PlanLike, *, compact: bool, pad_to_multiple_of: int | None = None,
               host_widen: bool = False) -> HostLayout:
    """The :class:`HostLayout` of ``plan``: sizes only, no token is read."""
    p, c = _lengths(plan)
    b = len(p)
    total = p[None, :] + c
    n = round_up(int(total.max()) if b else 0, pad_to_multiple_of)  # as assemble computes L
    dtype = np.dtype(plan.tokens[0].dtype) if b else np.dtype(np.uint32)  # as assemble
    if dtype not in _TOKEN_VIEWS or not dtype.isnative:
        raise DeviceError(f"token dtype {dtype} is not supported by the device feeder "
                          f"(supported: {sorted(str(d) for d in _TOKEN_VIEWS)}, native byte order)")
    rows = META_COMPACT if compact else META_PADDED
    off = _align(rows * b * 8)
    cols = []
    for name, v in (plan.columns or {}).items():
        v = np.asarray(v)
        cols.append((name, off, v.dtype, tuple(v.shape)))
        off = _align(off + v.nbytes)
    if compact:
        stored = int(p.sum() + c.sum())
        count, tdt = stored + 1, dtype
    else:
        stored, count = 0, 2 * b * n
        tdt = np.dtype(np.int64) if host_widen else dtype
    end = off + count * tdt.itemsize
    if host_widen and not compact:  # the masks too: the batch arrives complete, as one copy
        mask_off = _align(end)
        return HostLayout(compact, b, n, stored, rows, off, count, tdt, tuple(cols), mask_off + 3 * b * n, mask_off)
    return HostLayout(compact, b, n, stored, rows, off, count, tdt, tuple(cols), end)


def write_host(plan: _PlanLike, lay: HostLayout, buf: np.ndarray, *, pad_id: int) -> None:
    """Gather ``plan`` into ``buf`` (uint8, at least ``lay.nbytes``) as ``lay`` says.

    Every token is written once: for the host-widened layout by one pass of the C kernel
    (``pairpack/_native.c``, rows and masks) when it is built; otherwise by one
    ``np.concatenate(..., out=)`` over memory-map slices in output order (one slice per segment:
    Python work per row, none per token, as in ``assemble``'s numpy path).
    """
    p, c = _lengths(plan)
    b, n = lay.batch, lay.length
    meta = buf[: lay.meta_rows * b * 8].view(np.int64).reshape(lay.meta_rows, b)
    meta[0] = p
    meta[1:3] = c
    meta[3] = np.arange(b) if plan.indices is None else np.asarray(plan.indices, dtype=np.int64)
    np.add(p, c, out=meta[4:6])
    for name, off, dt, shape in lay.columns:
        v = np.asarray((plan.columns or {})[name])
        buf[off:off + v.nbytes].view(dt).reshape(shape)[...] = v
    tok = buf[lay.tok_off:lay.tok_off + lay.tok_count * lay.tok_dtype.itemsize].view(lay.tok_dtype)
    if lay.mask_off >= 0 and b:
        masks = buf[lay.mask_off:lay.mask_off + 3 * b * n].view(np.bool_).reshape(3, b, n)
        nat = _accel.native
        shards, shard_of = (plan.shards, plan.shard_of) if getattr(plan, "shards", None) else shards_of(plan.tokens)
        if nat is not None and native_applies(shards, pad_id):
            # one C pass writes the int64 rows and the masks straight into the pinned buffer
            write_native(nat, shards, shard_of, plan.prompt_starts, p, plan.completion_starts, c, n, pad_id, tok, masks)
            return
        pos = np.arange(n)
        np.less(pos, meta[0][:, None], out=masks[0])
        np.less(pos, meta[4:6][:, :, None], out=masks[1:])
    # slice plain ndarray views of the memory maps: slicing an np.memmap costs ~1.5 us (its
    # __array_finalize__), a plain view ~0.2 us, and a batch takes 3B to 6B slices
    base = {id(t): t for t in plan.tokens}
    plain = {k: np.asarray(t) for k, t in base.items()}
    tokens = [plain[id(t)] for t in plan.tokens]
    ps, pl = np.asarray(plan.prompt_starts).tolist(), p.tolist()
    cs, cl = np.asarray(plan.completion_starts).reshape(2, b).tolist(), c.tolist()
    pieces: list[np.ndarray] = []
    if lay.compact:
        # stream: all prompts, then all chosen, then all rejected, then one pad_id; meta rows 6..8
        # let the device find row (s, b) position j at prompt_off[b] + j for j < P and at
        # (comp_off[s, b] - P) + j for P <= j < P + C
        pieces += [tokens[i][ps[i]:ps[i] + pl[i]] for i in range(b)]
        for side in (0, 1):
            pieces += [tokens[i][cs[side][i]:cs[side][i] + cl[side][i]] for i in range(b)]
        if pieces:
            np.concatenate(pieces, out=tok[: lay.total])
            tok[lay.total] = pad_id  # OverflowError when pad_id does not fit, as assemble's np.full
        p_end = np.cumsum(p)
        meta[6] = p_end - p
        c_off = np.cumsum(c.reshape(-1)).reshape(2, b) - c + (int(p_end[-1]) if b else 0)
        np.subtract(c_off, p, out=meta[7:9])
    elif b:
        pad = np.full(n, pad_id, dtype=np.dtype(tokens[0].dtype))  # as assemble: pad_id must fit
        tl = meta[4:6].tolist()
        for side in (0, 1):
            s_cs, s_cl, s_tl = cs[side], cl[side], tl[side]
            for i in range(b):
                t = tokens[i]
                pieces.append(t[ps[i]:ps[i] + pl[i]])
                pieces.append(t[s_cs[i]:s_cs[i] + s_cl[i]])
                pieces.append(pad[: n - s_tl[i]])
        if pieces:
            # casting="unsafe" mirrors assemble's astype for (impossible) mixed-dtype shards and
            # widens losslessly into int64 for the host_widen variant
            np.concatenate(pieces, out=tok, casting="unsafe")


# --- device side: expansion (same code on CPU tensors) ------------------------------------------
def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dt)).dtype


def expand(staged: torch.Tensor, lay: HostLayout, positions: torch.Tensor | None = None) -> Triplets:
    """Turn a staging byte tensor (uint8 ``(>= lay.nbytes,)``, on any device) into a :class:`Triplets`.

    Equal bit for bit to ``assemble`` of the same plan. Only vectorised torch ops whose output
    shapes are known on the host (no ``nonzero``, no ``.item()``), so on CUDA nothing here waits
    for the device. ``positions`` is an optional cached ``arange(>= L)`` int64 on the same device.
    """
    b, n = lay.batch, lay.length
    dev = staged.device
    meta = staged[: lay.meta_rows * b * 8].view(torch.int64).view(lay.meta_rows, b)
    if lay.mask_off >= 0:  # written by the host: views only, no kernel
        masks = staged[lay.mask_off:lay.mask_off + 3 * b * n].view(torch.bool).view(3, b, n)
        prompt_mask, seq_mask = masks[0], masks[1:]
    else:
        pos = positions[:n] if positions is not None and positions.numel() >= n else torch.arange(n, device=dev)
        prompt_mask = pos < meta[0][:, None]  # (B, L)
        seq_mask = pos < meta[4:6][:, :, None]  # (2, B, L): rows P + C and P + R
    vdt, mask = _TOKEN_VIEWS.get(lay.tok_dtype, (torch.int64, None))
    tok = staged[lay.tok_off:lay.tok_off + lay.tok_count * lay.tok_dtype.itemsize].view(vdt)
    wide = tok.to(torch.int64)
    if mask is not None:
        wide.bitwise_and_(mask)  # undo the sign extension of the int16/int32 view
    if lay.compact:
        # source of row (s, b) position j: prompt_off[b] + j inside the prompt, (comp_off[s, b] - P)
        # + j inside the completion, `total` (the pad_id after the stream) beyond the real tokens
        src = torch.where(prompt_mask, meta[6][:, None], meta[7:9][:, :, None])
        src += pos
        src = torch.where(seq_mask, src, lay.total)
        seqs = wide[src]  # one gather (advanced indexing: no sync; 5x faster than take on CPU)
    else:
        seqs = wide.view(2, b, n)
    cols = {name: staged[off:off + int(np.prod(shape, dtype=np.int64)) * dt.itemsize]
            .view(_torch_dtype(dt)).view(shape) for name, off, dt, shape in lay.columns}
    return Triplets(
        preferred_seq=seqs[0],
        unpreferred_seq=seqs[1],
        prompt_mask=prompt_mask,
        preferred_seq_mask=seq_mask[0],
        unpreferred_seq_mask=seq_mask[1],
        indices=meta[3],
        prompt_lengths=meta[0],
        chosen_lengths=meta[1],
        rejected_lengths=meta[2],
        columns=cols,
    )


def _tensors(t: "Triplets | PackedBatch") -> list[torch.Tensor]:
    return t.tensors()


# --- packed layouts: a built batch staged as one byte buffer ---------------------------------------
@dataclass(frozen=True)
class PackedStaging:
    """Where each tensor of a :class:`~pairpack.batch.layouts.PackedBatch` lives in a staging buffer:
    ``(field or "col:<name>", byte offset, torch dtype, shape)``; ``nbytes`` in all."""

    parts: tuple[tuple[str, int, torch.dtype, tuple[int, ...]], ...]
    nbytes: int
    layout: str
    max_seqlen: int
    num_scored: int


def stage_packed(batch: "PackedBatch") -> PackedStaging:
    """The :class:`PackedStaging` of ``batch`` (sizes only)."""
    parts = []
    off = 0
    named = [(f.name, getattr(batch, f.name)) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    named += [(f"col:{k}", v) for k, v in batch.columns.items()]
    for name, t in named:
        parts.append((name, off, t.dtype, tuple(t.shape)))
        off = _align(off + t.numel() * t.element_size())
    return PackedStaging(tuple(parts), off, batch.layout, batch.max_seqlen, batch.num_scored)


def write_packed(batch: "PackedBatch", st: PackedStaging, buf: np.ndarray) -> None:
    """Each tensor's bytes into ``buf`` (uint8) at its offset."""
    for name, off, _, _ in st.parts:
        t = batch.columns[name[4:]] if name.startswith("col:") else getattr(batch, name)
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.numel() else None
        if raw is not None:
            buf[off:off + raw.size] = raw


def unstage_packed(staged: torch.Tensor, st: PackedStaging) -> "PackedBatch":
    """The batch as views of ``staged`` (the copied buffer, any device)."""
    from .layouts import PackedBatch

    kw: dict[str, Any] = {}
    cols: dict[str, torch.Tensor] = {}
    for name, off, dt, shape in st.parts:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        t = staged[off:off + n].view(dt).reshape(shape)
        if name.startswith("col:"):
            cols[name[4:]] = t
        else:
            kw[name] = t
    return PackedBatch(layout=st.layout, max_seqlen=st.max_seqlen, num_scored=st.num_scored, columns=cols, **kw)


# --- engines: what the ring needs from a device ---------------------------------------------------
class _Event(Protocol):
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class _Future(Protocol):
    def result(self) -> Any: ...


class _Done:
    """A result computed at enqueue time (CUDA kernels are queued, CPU work is done)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Later:
    """A result computed on first use (views of a copy whose future may not have run yet)."""

    __slots__ = ("fn", "value", "done")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.value, self.done = fn, None, False

    def result(self) -> Any:
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


class _CompletedEvent:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _Engine:
    """The device operations of the ring; this base class is the CPU implementation (no pinning,
    no streams, work done at once).

    ``copy`` starts a host-to-device copy and returns (its future result, an event that fires once
    the host buffer may be rewritten); ``enqueue`` runs device work in order on the feeder's queue
    (its stream), after the copies started before it; ``record`` marks the queue's current end;
    ``hand_over`` makes the consumer see a batch. Tests substitute a fake engine whose queue runs
    lazily, to check that no buffer is rewritten before its copy ran.
    """

    stream: Any = None
    copy_stream: Any = None

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.clone()  # the ring buffer is rewritten later: results must not alias it

    def copy(self, host: torch.Tensor, *, expand_after: bool = True) -> tuple[_Future, _Event]:
        """Start the copy of ``host``; ``expand_after``: device work on the feeder's queue reads it."""
        fut = self.enqueue(lambda: self.to_device(host))
        return fut, self.record()

    def enqueue(self, fn: Callable[[], Any]) -> _Future:
        return _Done(fn())

    def record(self) -> _Event:
        return _CompletedEvent()

    def hand_over(self, ready: _Event, fut: _Future, one_storage: bool = False) -> Any:
        return fut.result()


def require_cuda(device: torch.device | str) -> None:
    """Raise :class:`DeviceError` when ``device`` is a CUDA device and CUDA is not available: the one
    check behind ``DeviceFeeder(device)`` and ``Loader(device=...)``."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} was asked for, but CUDA is not available "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                          f"use device='cpu' or None")


class _CudaEngine(_Engine):
    """Pinned host buffers, a copy stream and an expansion stream, events; the consumer waits
    device-side only.

    Copies get their own stream so that a DMA never queues behind an expansion kernel waiting
    for SMs that a long training kernel holds: the copy engine works independently of the SMs.
    """

    def __init__(self, device: torch.device) -> None:
        require_cuda(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        super().__init__(device)
        self.copy_stream = torch.cuda.Stream(device=device)
        # high priority: the expansion kernels are tiny; they should be scheduled as soon as an SM
        # frees up rather than after a long training kernel drains (-1: torch's highest priority)
        self.stream = torch.cuda.Stream(device=device, priority=-1)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, host: torch.Tensor, *, expand_after: bool = True) -> tuple[_Future, _Event]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            staged = host.to(self.device, non_blocking=True)  # async DMA from pinned memory
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        if expand_after:
            self.stream.wait_event(done)  # expansion after the copy, device-side
            staged.record_stream(self.stream)  # allocated on the copy stream, read on the expansion stream
        return _Done(staged), done

    def enqueue(self, fn: Callable[[], Any]) -> _Future:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            return _Done(fn())

    def record(self) -> _Event:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def hand_over(self, ready: _Event, fut: _Future, one_storage: bool = False) -> Any:
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(ready)  # device-side wait: the host returns at once
        out = fut.result()
        # allocated on the feeder's streams, used on `cur`; views of one buffer need one call
        for t in _tensors(out)[:1] if one_storage else _tensors(out):
            t.record_stream(cur)
        return out


def _make_engine(device: Any) -> _Engine:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        return _CudaEngine(dev)
    if dev.type == "cpu":
        return _Engine(dev)
    raise DeviceError(f"device {str(dev)!r} is not supported by the device feeder (use 'cuda' or 'cpu')")


# --- the ring ----------------------------------------------------------------------------------------
class _Slot:
    __slots__ = ("buf", "view", "copied")

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None  # uint8 staging buffer (pinned on CUDA)
        self.view: np.ndarray | None = None  # numpy view of buf, written by the host gather
        self.copied: _Event | None = None  # recorded after the last copy out of buf


class DeviceFeeder:
    """Assemble batch plans into reusable (pinned) buffers and deliver them as ``Triplets`` on ``device``.

    ``get()`` returns, in submission order, exactly ``assemble(*plan.args(), pad_id=...,
    pad_to_multiple_of=..., indices=..., columns=...).to(device)``, bit for bit. Typical use (the
    Loader's)::

        feeder = DeviceFeeder("cuda", pad_id=ds.pad_id)
        for plan in plans:               # keep up to `prefetch` plans submitted ahead
            feeder.submit(plan)
            if feeder.pending >= feeder.prefetch:
                yield feeder.get()
        while feeder.pending:
            yield feeder.get()
        feeder.close()

    Args:
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device``, ``"cpu"`` or None (CPU).
        pad_id: the id written at padded positions.
        pad_to_multiple_of: round ``L`` up to a multiple of this.
        prefetch: ring slots = copies that may be in flight at once (>= 1). Submitting more batches
            ahead than this makes ``submit`` wait (on the oldest slot's copy only).
        compact: compact transfer (see the module docstring); False sends padded rows.
        host_widen: with ``compact=False``, the host writes the finished batch (int64 rows and the
            masks, by the C kernel when built) and the device receives it in one copy, running no
            kernel. Moves the most bytes but makes the fewest CUDA calls per batch (docs/gpu.md
            compares the modes).

    Attributes:
        stream: the feeder's expansion stream, the last to touch a batch (None on CPU).
        copy_stream: the feeder's host-to-device copy stream (None on CPU).
        host_allocations: how many ring buffers were allocated so far (``prefetch`` at most, plus
            one per growth).
    """

    def __init__(self, device: Any = None, *, pad_id: int, pad_to_multiple_of: int | None = None,
                 prefetch: int = 2, compact: bool = False, host_widen: bool = True,
                 options: PlanOptions | None = None, _engine: _Engine | None = None) -> None:
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ArgumentError(f"prefetch must be an int >= 1, got {prefetch!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ArgumentError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self._engine = _engine if _engine is not None else _make_engine(device)
        self.device: torch.device = self._engine.device
        self.stream = self._engine.stream
        self.copy_stream = self._engine.copy_stream
        self.pad_id = int(pad_id)
        if options is not None and pad_to_multiple_of is not None:
            raise ArgumentError("give pad_to_multiple_of in options or as a keyword, not both")
        self.options = options or PlanOptions(pad_to_multiple_of=pad_to_multiple_of)
        self.pad_to_multiple_of = self.options.pad_to_multiple_of
        self.prefetch = prefetch
        self.compact = bool(compact)
        self._host_widen = bool(host_widen) and not compact
        self._slots = [_Slot() for _ in range(prefetch)]
        self._next = 0
        self._pending: deque[tuple[_Future, _Event, bool]] = deque()
        self._positions: torch.Tensor | None = None  # cached arange on the device (feeder stream)
        self._closed = False
        self.host_allocations = 0
        self.bytes_copied = 0

    def __enter__(self) -> "DeviceFeeder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "compact" if self.compact else ("padded, host-widened" if self._host_widen else "padded")
        return f"DeviceFeeder(device={str(self.device)!r}, {mode}, prefetch={self.prefetch}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """Batches submitted and not yet returned by :meth:`get`."""
        return len(self._pending)

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("this DeviceFeeder is closed")

    def _pos(self, n: int) -> torch.Tensor:
        # runs inside enqueued work, i.e. on the feeder stream: the cache is only used there
        if self._positions is None or self._positions.numel() < n:
            cap = max(256, 1 << max(n - 1, 0).bit_length())
            self._positions = torch.arange(cap, dtype=torch.int64, device=self.device)
        return self._positions

    def submit(self, plan: "BatchPlan | _PlanLike") -> None:
        """Gather ``plan`` into the next ring buffer and start its copy and expansion (async on CUDA).

        Waits only when this ring slot's previous copy has not finished yet.
        """
        self._check_open()
        packed = None
        if self.options.packed:
            from .layouts import build

            packed = build(plan, self.pad_id, self.options)  # type: ignore[arg-type]
            lay: Any = stage_packed(packed)
        else:
            lay = layout_for(plan, compact=self.compact, pad_to_multiple_of=self.pad_to_multiple_of,
                             host_widen=self._host_widen)
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.copied is not None:
            slot.copied.synchronize()  # this buffer's last DMA must be done before we overwrite it
            slot.copied = None
        if slot.buf is None or slot.buf.numel() < lay.nbytes:
            # grow: the old buffer is dropped after its copy finished (waited above); torch's pinned
            # allocator also keeps it until the copies it recorded are done
            size = max(MIN_BUFFER, 1 << max(lay.nbytes - 1, 0).bit_length())
            slot.buf = self._engine.host_buffer(size)
            slot.view = slot.buf.numpy()
            self.host_allocations += 1
        buf, view = slot.buf, slot.view
        eng = self._engine
        if packed is not None:
            write_packed(packed, lay, view)
            staged, slot.copied = eng.copy(buf[: lay.nbytes], expand_after=False)
            self._pending.append((_Later(lambda: unstage_packed(staged.result(), lay)), slot.copied, True))
            self.bytes_copied += lay.nbytes
            return
        write_host(plan, lay, view, pad_id=self.pad_id)  # type: ignore[arg-type]
        host = buf[: lay.nbytes]
        if lay.mask_off >= 0:
            # the batch arrives complete: its tensors are views of the copy, ready when the copy
            # is (no expansion stream, no kernel, fewer CUDA calls per batch)
            staged, slot.copied = eng.copy(host, expand_after=False)
            self._pending.append((_Later(lambda: expand(staged.result(), lay)), slot.copied, True))
        else:
            staged, slot.copied = eng.copy(host)
            out = eng.enqueue(lambda: expand(staged.result(), lay, self._pos(lay.length)))
            self._pending.append((out, eng.record(), False))
        self.bytes_copied += lay.nbytes

    def get(self) -> "Triplets | PackedBatch":
        """The oldest submitted batch, on ``device``, ready for use on the caller's current stream."""
        self._check_open()
        if not self._pending:
            raise DeviceError("DeviceFeeder.get() called with no batch submitted")
        out, ready, one_storage = self._pending.popleft()
        return self._engine.hand_over(ready, out, one_storage)

    def close(self) -> None:
        """Wait for the copies out of the ring buffers, then release them; pending batches are dropped."""
        if self._closed:
            return
        for s in self._slots:
            if s.copied is not None:
                s.copied.synchronize()
        for _, ready, _ in self._pending:
            ready.synchronize()
        self._pending.clear()
        self._slots = []
        self._positions = None
        self._closed = True
