"""``pairpack.Loader``: deterministic, resumable, rank-aware batches of :class:`~pairpack.Triplets`.

One epoch is planned up front from the flat length array (:mod:`pairpack.batch.sampling` gives the
order, :mod:`pairpack.batch.plan` the batches), so the batches are a pure function of
``(seed, epoch, dataset fingerprint, options)``; workers, devices and resumes only change *who*
assembles batch ``j``, never *what* it holds. An elastic resume (a state loaded by a job of
another world size) re-plans the rest of the epoch: the pairs the earlier job's ranks were not
served, in epoch order, split over the new ranks (:func:`pairpack.batch.plan.served_pairs`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import xxhash

from ..errors import ArgumentError, ArgumentTypeError, ColumnNotFoundError, DeviceError, StateError
from ..read.dataset import Dataset, open_dataset
from . import plan as bt
from .mixture import Mixture
from .options import PlanOptions, Truncation, options_from
from .sampling import epoch_order, plan_seed, resolve_rank

if TYPE_CHECKING:
    from .layouts import PackedBatch
    from .triplets import Triplets

__all__ = ["Loader"]

STATE_FORMAT = "pairpack.loader/1"
# options that shape the batches: a state saved under other values cannot be resumed (except
# world_size: another size is an elastic resume)
_ORDER_OPTIONS = ("batch_size", "max_tokens", "shuffle", "drop_last", "group_by_length", "window", "world_size",
                  "max_length", "truncation", "min_completion_tokens", "pad_to_multiple_of", "oversize",
                  "indices_digest")
# options a state records only when they differ from their default, so states of the padded
# layout stay as they were (a state without them means the default)
_LAYOUT_OPTIONS = {"layout": "padded", "max_row_tokens": None}


class Loader:
    """Batches of a pairpack dataset (or a mixture of several) for training: an iterable of
    :class:`~pairpack.Triplets`.

    Args:
        ds: a :class:`~pairpack.Dataset` or the path of one; or a mixture, a dict of name ->
            dataset or path (see ``weights``, ``epoch_size`` and :mod:`pairpack.batch.mixture`):
            each batch then carries ``source`` (position of each pair's source in
            :attr:`names`) and ``indices`` are positions within the source.
        weights: a mixture's relative weights, name -> number (or a sequence in source order),
            normalised; default each source's size.
        epoch_size: a mixture's pairs per epoch (default the sum of the sources' pairs taking
            part). Each source gives its share exactly (to rounding), without repetition while
            the share is at most its size, else every pair the same number of times to within one.
        split: serve only a named split (:meth:`Dataset.split <pairpack.Dataset.split>`, e.g.
            ``"train"``); for a mixture a name for every source, or name -> split per source.
        batch_size: pairs per batch, per rank (exactly one of ``batch_size``/``max_tokens``).
        max_tokens: per-rank budget on ``2 * B * L`` (padded tokens of both rows); never exceeded.
        shuffle: random epoch order (else dataset order).
        seed: with the epoch and ``ds.fingerprint``, the only input of the order (``>= 0``).
        drop_last: ``DistributedSampler`` semantics: trim the order to a multiple of the world
            size instead of repeating its first pairs; with ``batch_size`` also drop a short last
            batch.
        group_by_length: sort pairs by length within large windows of the shuffled order, then
            shuffle the batches (little padding, random order). See :func:`pairpack.batch.plan.plan_batches`.
        window: grouping window in pairs (default 512 batches per rank).
        rank: this process's rank; default from ``torch.distributed`` when it is initialised,
            else 0. Every rank gets the same number of batches.
        world_size: the number of ranks; default from ``torch.distributed``, else 1.
        max_length: truncate pairs so that ``P + C`` and ``P + R`` fit (both rows with one prompt).
        truncation: ``"keep_end"`` (drop prompt tokens from its start) or ``"keep_start"``; or a
            :class:`~pairpack.batch.options.Truncation` in place of the three truncation keywords.
        min_completion_tokens: completions are cut no shorter than this (``>= 1``) before the prompt.
        pad_to_multiple_of: round each batch's padded length ``L`` up to a multiple of this.
        layout: ``"padded"`` (:class:`~pairpack.Triplets`, default), ``"packed"`` or
            ``"prefix_shared"`` (:class:`~pairpack.batch.layouts.PackedBatch`); ``max_tokens`` then
            bounds rows x row length.
        max_row_tokens: packed layouts: the longest row (default: the whole ``max_tokens``
            budget, or the batch); 0: one pair per row.
        options: the planning options as a :class:`~pairpack.batch.options.PlanOptions` instead
            of the keywords above.
        oversize: with ``max_tokens``, a pair over the budget alone is ``"truncate"``-d to fit
            (default), ``"skip"``-ped (counted) or raises (``"error"``).
        num_workers: worker processes assembling batches (``torch.utils.data.DataLoader`` workers:
            they share the memory maps, so memory stays flat). The batches and their order do not
            depend on it.
        prefetch_factor: batches each worker prepares ahead.
        device: None/"cpu" for CPU tensors; a CUDA device hands the batch plans to
            ``pairpack.cuda.DeviceFeeder`` (pinned buffers, asynchronous copies). Plans are made in
            this process (index arithmetic only) and the feeder assembles, so ``num_workers`` is
            not used on that path.
        prefetch: batches in flight, passed to the DeviceFeeder (``pairpack.cuda``). Every layout
            travels through the feeder's pinned buffers.
        compact: send only the stored tokens and build the rows on the GPU (a transfer mode of
            the DeviceFeeder).
        host_widen: build the finished int64 rows on the host and copy them in one transfer (the
            default transfer mode, the fastest measured).
        columns: per-pair columns to carry in ``Triplets.columns``.
        indices: iterate over these pairs only (a split, e.g. the training part of a dataset):
            distinct pair indices in ``[0, len(ds))``. The order is then a pure function of (seed,
            epoch, fingerprint, indices), and a saved state resumes only with the same indices.
            For a mixture: name -> indices within that source.

    Pairs whose chosen and rejected become identical through truncation are left out of every
    epoch and counted; see :attr:`counts`.
    """

    def __init__(
        self,
        ds: "Dataset | str | os.PathLike | Mapping[str, Dataset | str | os.PathLike]",
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_by_length: bool = False,
        window: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        max_length: int | None = None,
        truncation: "Truncation | str | None" = None,
        min_completion_tokens: int = 1,
        pad_to_multiple_of: int | None = None,
        oversize: str = "truncate",
        layout: str = "padded",
        max_row_tokens: int | None = None,
        options: PlanOptions | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        device: Any = None,
        prefetch: int = 2,
        compact: bool = False,
        host_widen: bool = True,
        columns: Sequence[str] = (),
        indices: "Sequence[int] | np.ndarray | Mapping[str, Sequence[int] | np.ndarray] | None" = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        epoch_size: int | None = None,
        split: str | Mapping[str, str] | None = None,
    ) -> None:
        self.mixture: Mixture | None = None
        if isinstance(ds, Mapping):
            self.mixture = Mixture(ds, weights=weights, epoch_size=epoch_size)
            self.ds: Dataset = self.mixture.view
        else:
            if weights is not None or epoch_size is not None:
                raise ArgumentError("weights and epoch_size apply to a mixture: pass a dict of name -> dataset")
            self.ds = ds if isinstance(ds, Dataset) else open_dataset(ds)
        self.options, self.truncation_options = options_from(
            options, truncation, batch_size=batch_size, max_tokens=max_tokens, shuffle=shuffle, drop_last=drop_last,
            group_by_length=group_by_length, window=window, pad_to_multiple_of=pad_to_multiple_of, oversize=oversize,
            layout=layout, max_row_tokens=max_row_tokens, max_length=max_length,
            min_completion_tokens=min_completion_tokens)
        bt.check_plan(self.options, self.truncation_options)
        if _negative(seed, "seed"):
            raise ArgumentError(f"seed must be >= 0, got {seed}")
        if _negative(num_workers, "num_workers"):
            raise ArgumentError(f"num_workers must be >= 0, got {num_workers}")
        for c in columns:
            if c not in self.ds.column_names:
                raise ColumnNotFoundError(self.ds.path, c, self.ds.column_names)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.seed = int(seed)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.device, self.prefetch, self.compact, self.host_widen = device, prefetch, compact, host_widen
        self.columns = tuple(columns)
        indices = self._subset(indices, split)
        self.indices = None if indices is None else _check_indices(indices, len(self.ds))
        # a split is part of the order's identity: its digest goes into the state (None: all pairs)
        self.indices_digest = (None if self.indices is None
                               else xxhash.xxh3_64_hexdigest(self.indices.tobytes()))
        # the truncation applied to every pair (a budget caps it when oversize="truncate")
        self.effective_truncation = self.options.max_length_cap(self.truncation_options)
        self._fingerprint = self.ds.fingerprint if self.mixture is None else self.mixture.fingerprint
        self._epoch = 0
        self._position = 0  # batches of the current epoch handed to the user
        self._pending: int | None = None  # start of the next iteration after load_state_dict
        self._valid: np.ndarray | None = None
        self._counts: dict[str, int] | None = None
        self._plan_cache: tuple[Any, np.ndarray, np.ndarray] | None = None
        # elastic resume: (world_size, position) of the earlier parts of the current epoch, served
        # by jobs of other sizes; this loader serves what they left, re-split over its own ranks
        self._elastic: tuple[tuple[int, int], ...] = ()
        self._feeder_cls = self._device_feeder_class()

    # the options as attributes, read-only views of the two option objects
    batch_size = property(lambda self: self.options.batch_size, doc='Pairs per batch per rank, or None when batches are bounded by ``max_tokens``.')
    max_tokens = property(lambda self: self.options.max_tokens, doc='Token budget per batch per rank (``2 x B x L``, or ``R x T`` packed), or None.')
    shuffle = property(lambda self: self.options.shuffle, doc="Whether each epoch's order is shuffled.")
    drop_last = property(lambda self: self.options.drop_last, doc="Whether an epoch's short last batch is dropped.")
    group_by_length = property(lambda self: self.options.group_by_length, doc='Whether pairs are sorted by length within shuffled windows.')
    window = property(lambda self: self.options.window, doc='The length-grouping window, in pairs (None: the default, 512 batches per rank).')
    oversize = property(lambda self: self.options.oversize, doc='What happens to a pair over the budget alone: ``"truncate"``, ``"skip"`` or ``"error"``.')
    pad_to_multiple_of = property(lambda self: self.options.pad_to_multiple_of, doc='Row lengths are rounded up to a multiple of this (None: not rounded).')
    layout = property(lambda self: self.options.layout, doc='The batch layout: ``"padded"``, ``"packed"`` or ``"prefix_shared"``.')
    max_row_tokens = property(lambda self: self.options.max_row_tokens, doc='The longest packed row in tokens (None: the budget; 0: one pair per row).')
    max_length = property(lambda self: self.truncation_options.max_length, doc='The ``max_length`` given (tokens per row), or None.')
    truncation = property(lambda self: self.truncation_options.mode, doc='The truncation mode: ``"keep_end"`` or ``"keep_start"``.')
    min_completion_tokens = property(lambda self: self.truncation_options.min_completion_tokens, doc='Completions are cut no shorter than this before the prompt is.')
    effective_max_length = property(lambda self: self.effective_truncation.max_length,
                                    doc="The row length pairs are truncated to: ``max_length``, or the one a token budget "
                                        "sets (None: no truncation).")

    def _subset(self, indices: Any, split: str | Mapping[str, str] | None) -> np.ndarray | None:
        """The pairs served (union indices for a mixture), from ``indices`` and ``split``; None: all."""
        if self.mixture is None:
            if split is None:
                return indices
            if indices is not None:
                raise ArgumentError("give indices or split, not both")
            if not isinstance(split, str):
                raise ArgumentError(f"split must be a split name for one dataset, got {split!r}")
            return self.ds.split(split)
        mix, per = self.mixture, {}
        sources = dict(zip(mix.names, mix.view.datasets))
        if split is not None:
            chosen = {n: split for n in mix.names} if isinstance(split, str) else dict(split)
            for n, name in chosen.items():
                if n not in sources:
                    raise ArgumentError(f"split names source {n!r}, which is not in the mixture {list(mix.names)}")
                per[n] = sources[n].split(name)
        if indices is not None:
            if not isinstance(indices, Mapping):
                raise ArgumentError("a mixture takes indices as a dict of source name -> pair indices")
            for n, idx in indices.items():
                if n not in sources:
                    raise ArgumentError(f"indices name source {n!r}, which is not in the mixture {list(mix.names)}")
                if n in per:
                    raise ArgumentError(f"source {n!r}: give indices or split, not both")
                per[n] = _check_indices(idx, len(sources[n]))
        if not per:
            return None
        off = mix.offsets
        return np.concatenate([np.asarray(per[n], dtype=np.int64) + off[s] if n in per
                               else np.arange(off[s], off[s + 1], dtype=np.int64)
                               for s, n in enumerate(mix.names)])

    @property
    def names(self) -> tuple[str, ...]:
        """A mixture's source names, in the order of a batch's ``source`` values (one dataset: ``()``)."""
        return () if self.mixture is None else self.mixture.names

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, index)`` int64 arrays of the pair indices :meth:`batches` gives (for a mixture
        they index the union of the sources; one dataset: source 0 and the indices themselves)."""
        g = np.asarray(indices, dtype=np.int64)
        if self.mixture is None:
            return np.zeros(g.shape, dtype=np.int64), g
        src = self.mixture.source_of(g)
        return src, g - self.mixture.offsets[src]

    def source_counts(self) -> dict[str, int]:
        """Pairs each mixture source gives per epoch (one dataset: ``{}``)."""
        if self.mixture is None:
            return {}
        pools = self.mixture.pools(self._prepare())
        return dict(zip(self.mixture.names, self.mixture.counts([len(p) for p in pools]).tolist()))

    # --- dataset-wide preparation (once) ---------------------------------------------------------
    def _prepare(self) -> np.ndarray | None:
        """Pairs taking part (None = all), computed once: drops pairs over the budget ("skip") and
        pairs that truncation makes identical."""
        if self._counts is not None:
            return self._valid
        lengths = self.ds.lengths
        n = lengths.shape[1]
        if self.indices is None:
            keep = np.ones(n, dtype=bool)
        else:
            keep = np.zeros(n, dtype=bool)
            keep[self.indices] = True
        over = bt.oversize_mask(lengths, options=self.options, truncation=self.effective_truncation)
        bt.check_oversize(over, self.options, str(self.ds.path))
        over &= keep
        keep &= ~over
        same = bt.identical_after_truncation(self.ds, truncation=self.effective_truncation)
        same &= keep
        keep &= ~same
        truncated = 0
        if self.effective_max_length is not None:
            row = lengths[0] + np.maximum(lengths[1], lengths[2])
            truncated = int(((row > self.effective_max_length) & keep).sum())
        pairs = n if self.indices is None else len(self.indices)
        self._counts = {"pairs": pairs, "used": int(keep.sum()), "truncated": truncated,
                        "dropped_identical": int(same.sum()), "skipped_oversize": int(over.sum())}
        self._valid = None if keep.all() else np.flatnonzero(keep).astype(np.int64)
        return self._valid

    @property
    def counts(self) -> dict[str, int]:
        """Dataset-wide counts: ``pairs``, ``used`` (taking part in epochs), ``truncated`` (used pairs
        shortened by ``max_length`` or the budget), ``dropped_identical`` (chosen == rejected after
        truncation), ``skipped_oversize`` (over ``max_tokens`` alone with ``oversize="skip"``)."""
        self._prepare()
        assert self._counts is not None  # internal invariant: _prepare() sets it
        return dict(self._counts)

    # --- the epoch plan ----------------------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's batches of ``epoch`` as CSR (pair indices, offsets); cached for one epoch."""
        key = (epoch, self._elastic)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1], self._plan_cache[2]
        valid = self._prepare()
        if self.mixture is not None:
            order = self.mixture.order(valid, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        else:
            order = epoch_order(len(self.ds), seed=self.seed, epoch=epoch, fingerprint=self._fingerprint,
                                shuffle=self.shuffle, subset=valid)
        opts = dict(options=self.options, truncation=self.effective_truncation)
        for k, (w, pos) in enumerate(self._elastic):
            # what part k's job (w ranks, pos batches each) was served leaves the epoch, in order
            served = bt.served_pairs(self.ds.lengths, order, position=pos, world_size=w,
                                     seed=plan_seed(self.seed, epoch, self._fingerprint, k), **opts)
            order = bt.remove_served(order, served)
        flat, offsets = bt.plan_rank(self.ds.lengths, order,
                                     seed=plan_seed(self.seed, epoch, self._fingerprint, len(self._elastic)),
                                     rank=self.rank, world_size=self.world_size, **opts)
        self._plan_cache = (key, flat, offsets)
        return flat, offsets

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch as int64 pair-index arrays, in order."""
        flat, offsets = self._plan(self._epoch)
        return np.split(flat, offsets[1:-1]) if len(offsets) > 1 else []

    @property
    def batch_sampler(self) -> "_BatchSampler":
        """A batch sampler for a plain ``DataLoader(range(len(ds)), batch_sampler=..., collate_fn=Collate(ds))``:
        this rank's batches of the current epoch (follows :meth:`set_epoch`)."""
        return _BatchSampler(self)

    def collate_fn(self) -> bt.Collate:
        """A :class:`~pairpack.batch.plan.Collate` with this loader's truncation and padding options."""
        return bt.Collate(self.ds, options=self.options, truncation=self.effective_truncation, columns=self.columns)

    def padding_efficiency(self) -> float:
        """Real tokens / tokens processed (padded: both rows) of this rank's batches in the current epoch."""
        return bt.padding_efficiency(self.ds.lengths, self.batches(), options=self.options,
                                     truncation=self.effective_truncation)

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (the same on every rank)."""
        return len(self._plan(self._epoch)[1]) - 1

    @property
    def epoch(self) -> int:
        """The epoch the next iteration serves (:meth:`set_epoch`)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration serves (its order is a pure function of it).

        A position restored by :meth:`load_state_dict` is kept only when ``epoch`` is the
        restored epoch.
        """
        if _negative(epoch, "epoch"):
            raise ArgumentError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._pending = None
            self._position = 0
            self._elastic = ()
        self._epoch = int(epoch)

    # --- state -------------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _ORDER_OPTIONS}
        out.update({k: getattr(self, k) for k, v in _LAYOUT_OPTIONS.items() if getattr(self, k) != v})
        return out

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: epoch, position (batches handed out this epoch), seed, fingerprint,
        rank and the options that shape the batches. All ranks are at the same position, so one
        rank's state resumes every rank."""
        return {"format": STATE_FORMAT, "epoch": self._epoch, "position": self._position, "seed": self.seed,
                "fingerprint": self._fingerprint, "num_pairs": len(self.ds), "rank": self.rank,
                "options": self._options(), "elastic": [list(x) for x in self._elastic],
                **({} if self.mixture is None else {"mixture": self.mixture.describe()})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches an uninterrupted run would yield next.

        Raises StateError when the state comes from another dataset (fingerprint), another seed or
        options that shape the batches differently (``num_workers`` and ``device`` may differ).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise StateError(f"not a pairpack loader state (expected format {STATE_FORMAT!r})")
        for key in ("epoch", "position", "seed", "fingerprint", "options"):
            if key not in state:
                raise StateError(f"loader state: missing field {key!r}")
        mine_mix = None if self.mixture is None else self.mixture.describe()
        if state.get("mixture") != mine_mix:
            raise StateError(f"loader state: field 'mixture' is {state.get('mixture')!r} but this loader serves "
                             f"{mine_mix!r}: the state belongs to another mixture")
        if state["fingerprint"] != self._fingerprint:
            raise StateError(f"loader state: field 'fingerprint' is {state['fingerprint']!r} but dataset "
                             f"{self.ds.path} has {self._fingerprint!r}: the state belongs to another dataset")
        if state["seed"] != self.seed:
            raise StateError(f"loader state: field 'seed' is {state['seed']} but this loader has seed {self.seed}")
        mine = self._options()
        theirs = state["options"]
        keys = [k for k in _ORDER_OPTIONS if k != "world_size"] + list(_LAYOUT_OPTIONS)
        diff = {k: (theirs.get(k, _LAYOUT_OPTIONS.get(k)), mine.get(k, _LAYOUT_OPTIONS.get(k))) for k in keys
                if theirs.get(k, _LAYOUT_OPTIONS.get(k)) != mine.get(k, _LAYOUT_OPTIONS.get(k))}
        if diff:
            text = ", ".join(f"{k}: state {a!r} vs loader {b!r}" for k, (a, b) in diff.items())
            raise StateError(f"loader state: options differ ({text}); the batches would differ")
        epoch, pos = state["epoch"], state["position"]
        if type(epoch) is not int or type(pos) is not int or epoch < 0 or pos < 0:
            raise StateError(f"loader state: epoch {epoch!r} / position {pos!r} must be ints >= 0")
        elastic = state.get("elastic", [])
        if not isinstance(elastic, list) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 and all(type(v) is int for v in x) and x[0] >= 1
                and x[1] >= 0 for x in elastic):
            raise StateError(f"loader state: field 'elastic' must be a list of [world_size >= 1, position >= 0], "
                             f"got {elastic!r}")
        parts = tuple((int(w), int(p)) for w, p in elastic)
        theirs_w = theirs.get("world_size")
        if type(theirs_w) is not int or theirs_w < 1:
            raise StateError(f"loader state: option 'world_size' must be an int >= 1, got {theirs_w!r}")
        if theirs_w != self.world_size:
            # elastic resume: the saving job's ranks were each served `pos` batches of what was
            # left of the epoch; this job re-splits the rest over its own ranks, from its start
            parts, pos = parts + ((theirs_w, pos),), 0
        self._epoch = epoch
        self._elastic = parts
        n = len(self)
        if pos > n:
            raise StateError(f"loader state: field 'position' {pos} exceeds the {n} batches of epoch {epoch}")
        self._position = pos
        self._pending = pos

    # --- iteration ---------------------------------------------------------------------------------
    def _make_plan(self, idx: np.ndarray) -> bt.BatchPlan:
        return bt.make_plan(self.ds, idx, truncation=self.effective_truncation, columns=self.columns)

    def __iter__(self) -> Iterator["Triplets | PackedBatch"]:
        flat, offsets = self._plan(self._epoch)
        nb = len(offsets) - 1
        start = self._pending if self._pending is not None else 0
        self._pending = None
        self._position = start
        if self._feeder_cls is not None:
            return self._iter_device(flat, offsets, start, nb)
        if self.num_workers > 0:
            return self._iter_workers(flat, offsets, start, nb)
        return self._iter_local(flat, offsets, start, nb)

    def _iter_local(self, flat: np.ndarray, offsets: np.ndarray, start: int, nb: int) -> Iterator["Triplets"]:
        kw = dict(options=self.options, truncation=self.effective_truncation, columns=self.columns)
        cut = offsets.tolist()
        if self.mixture is not None:
            yield from self._iter_local_mixture(flat, cut, start, nb, kw)
            return
        for j in range(start, nb):
            batch = [bt.batch_of(self.ds, flat[cut[j]:cut[j + 1]], **kw)]
            self._position = j + 1  # counted when handed out, so a state saved now resumes after it
            # the frame keeps no reference: once the caller drops a batch its memory is reused by
            # the next one while still in cache (measured ~20% faster in tools/bench_reader.py)
            yield batch.pop()

    def _iter_local_mixture(self, flat: np.ndarray, cut: list[int], start: int, nb: int,
                            kw: dict[str, Any]) -> Iterator["Triplets"]:
        """:meth:`_iter_local` for a mixture: ``source`` and local ``indices`` come from the plan,
        located for 64 batches at a time (one vectorised call instead of one per batch: the
        per-batch cost of a mixture over one dataset is two ``torch.from_numpy`` calls)."""
        import torch

        assert self.mixture is not None  # internal invariant: called for mixtures only
        base = end = start
        src = local = flat[:0]
        for j in range(start, nb):
            if j >= end:
                base, end = j, min(nb, j + 64)
                src, local = self.locate(flat[cut[base]:cut[end]])
            batch = [bt.batch_of(self.ds, flat[cut[j]:cut[j + 1]], **kw)]
            self._position = j + 1
            a, b = cut[j] - cut[base], cut[j + 1] - cut[base]
            out = batch.pop()
            # the batch holds the plan's pairs in plan order (every layout keeps the order it is given)
            out.indices, out.source = torch.from_numpy(local[a:b]), torch.from_numpy(src[a:b])
            yield out

    def _iter_workers(self, flat: np.ndarray, offsets: np.ndarray, start: int, nb: int) -> Iterator["Triplets"]:
        from torch.utils.data import DataLoader

        # Workers get batch numbers in order and DataLoader returns results in sampler order, so
        # the sequence is the one num_workers=0 gives. Workers assemble (the expensive part) and
        # hand back tensors through shared memory; the maps are shared (fork) or reopened by path.
        src = _PlannedBatches(self, flat, offsets)
        dl = DataLoader(src, batch_size=None, sampler=range(start, nb), num_workers=self.num_workers,
                        collate_fn=_identity, prefetch_factor=self.prefetch_factor)
        for j, batch in enumerate(dl, start):
            self._position = j + 1
            yield self._out(batch)

    def _device_feeder_class(self) -> Any:
        dev = self.device
        if dev is None:
            return None
        import torch

        try:
            d = torch.device(dev)
        except (RuntimeError, TypeError) as e:
            raise ArgumentError(f"device={dev!r} is not a torch device ({e})") from None
        if d.type == "cpu":
            return None
        try:
            from .cuda import DeviceFeeder, require_cuda
        except ImportError as e:
            raise DeviceError(f"device={dev!r}: the device path (pairpack.cuda.DeviceFeeder) is not available "
                              f"in this build ({e}); use device=None for CPU batches") from None
        require_cuda(d)
        return DeviceFeeder

    def _iter_device(self, flat: np.ndarray, offsets: np.ndarray, start: int, nb: int) -> Iterator["Triplets"]:
        feeder = self._feeder_cls(self.device, pad_id=self.ds.pad_id, options=self.options,
                                  prefetch=self.prefetch, compact=self.compact, host_widen=self.host_widen)
        try:
            ahead = start
            # keep `prefetch` plans submitted so the feeder's copies overlap the consumer's compute
            while ahead < nb and ahead - start < max(1, self.prefetch):
                feeder.submit(self._make_plan(flat[offsets[ahead]:offsets[ahead + 1]]))
                ahead += 1
            for j in range(start, nb):
                batch = feeder.get()
                if ahead < nb:
                    feeder.submit(self._make_plan(flat[offsets[ahead]:offsets[ahead + 1]]))
                    ahead += 1
                self._position = j + 1
                yield self._out(batch)
        finally:
            feeder.close()

    def _out(self, batch: Any) -> Any:
        """The batch as handed out: a mixture's gets ``source`` and source-local ``indices``."""
        return batch if self.mixture is None else self.mixture.localise(batch)

    def __repr__(self) -> str:
        size = f"batch_size={self.batch_size}" if self.batch_size is not None else f"max_tokens={self.max_tokens}"
        return (f"pairpack.Loader({self.ds.path}, {size}, rank={self.rank}/{self.world_size}, epoch={self._epoch}, "
                f"group_by_length={self.group_by_length}, max_length={self.max_length})")


def _negative(value: Any, name: str) -> bool:
    """``value < 0`` for a number; :class:`ArgumentTypeError` naming ``name`` when ``value`` is not
    comparable with 0 (a string, None)."""
    try:
        return bool(value < 0)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an integer >= 0, got {type(value).__name__}") from None


def _identity(x: Any) -> Any:
    return x


class _PlannedBatches:
    """Map-style dataset over batch numbers of one epoch plan, for DataLoader workers."""

    def __init__(self, loader: Loader, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.ds = loader.ds
        self.flat, self.offsets = flat, offsets
        self.kw = dict(options=loader.options, truncation=loader.effective_truncation, columns=loader.columns)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int) -> "Triplets":
        return bt.batch_of(self.ds, self.flat[self.offsets[j]:self.offsets[j + 1]], **self.kw)


class _BatchSampler:
    """This rank's batches of the loader's current epoch as lists of ints (a DataLoader batch_sampler)."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.loader.batches():
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.loader)


def _check_indices(indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """A split as a sorted int64 array; ValueError for repeats or indices outside ``[0, n)``."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ArgumentError(f"indices must be a 1-D sequence of integers, got shape {idx.shape} {idx.dtype}")
    idx = np.sort(idx.astype(np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= n):
        bad = idx[0] if idx[0] < 0 else idx[-1]
        raise ArgumentError(f"indices: pair {int(bad)} is out of range for {n} pairs")
    if idx.size > 1 and (np.diff(idx) == 0).any():
        raise ArgumentError(f"indices: pair {int(idx[1:][np.diff(idx) == 0][0])} appears more than once")
    return idx
