"""Mixtures: several datasets served by one :class:`~pairpack.Loader` with chosen proportions.

A mixture is a union of its sources' shards (:class:`MixtureView`, a :class:`~pairpack.Dataset`
over every source's memory maps; union index ``g`` of source ``s`` is ``offsets[s] + i``), and an
epoch draw (:meth:`Mixture.order`): each source gives its share of ``epoch_size`` exactly (largest
remainder rounding), without repetition while the share is at most the source's size, otherwise
whole passes (each a fresh shuffle) plus a sample without repetition, so every pair is drawn the
same number of times to within one. The draw is a pure function of ``(seed, epoch,
Mixture.fingerprint)``, the fingerprint covering the names, each source's fingerprint, the
weights and ``epoch_size``; the Loader's planner then batches the draw as it batches one
dataset's order (union indices may repeat).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import xxhash

from ..errors import ArgumentError
from ..format.manifest import tokenizer_key
from ..read.dataset import Dataset, open_dataset
from .sampling import epoch_rng

if TYPE_CHECKING:
    import torch

__all__ = ["Mixture", "MixtureView", "apportion"]

_DRAW_STREAM = 2  # epoch_rng stream of the mixture draw (0: pair order, 1: batch plan)


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """int64 ``(S,)`` counts summing to ``total``, proportional to ``weights`` (float ``(S,)``, >= 0,
    positive sum): floors of the quotas, then one more for the largest remainders (ties: the
    earlier source), so each count is within 1 of its exact share."""
    w = np.asarray(weights, dtype=np.float64)
    quota = total * (w / w.sum())
    base = np.floor(quota).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        rem = quota - base
        base[np.argsort(-rem, kind="stable")[:short]] += 1
    return base


def _identity(ds: Dataset) -> dict[str, Any]:
    """What must agree for ids of two sources to mean the same tokens and be served together."""
    m = ds.manifest
    return {"tokenizer": tokenizer_key(m.tokenizer), "vocab_size": m.vocab_size, "token_dtype": m.token_dtype,
            "pad_id": m.pad_id, "bos_id": m.bos_id, "eos_id": m.eos_id}


def _describe(ds: Dataset) -> str:
    m = ds.manifest
    t = m.tokenizer or {}
    name = t.get("name") or t.get("kind") or "none (token ids)"
    extra = f", hash {str(t['hash'])[:12]}" if t.get("hash") else ""
    return (f"tokenizer {name}{extra}, vocab_size {m.vocab_size}, {m.token_dtype}, pad_id {m.pad_id}, "
            f"bos_id {m.bos_id}, eos_id {m.eos_id}")


class MixtureView(Dataset):
    """Every source's shards read as one dataset (no copy: the sources' own memory maps).

    Union index ``offsets[s] + i`` is pair ``i`` of source ``s``. Columns are those every source
    has with the same dtype. Pickles as the sources' paths (DataLoader workers re-map them).
    """

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str]) -> None:  # noqa: D107
        first = datasets[0]
        self.datasets = tuple(datasets)
        self.names = tuple(names)
        self.path = Path(f"mixture({', '.join(names)})")
        common = [c for c in first.manifest.columns
                  if all(any(d.name == c.name and d.dtype == c.dtype for d in ds.manifest.columns)
                         for ds in datasets)]
        keep = {c.name for c in common}
        shards = [dataclasses.replace(s, columns={k: v for k, v in s.columns.items() if k in keep})
                  for ds in datasets for s in ds.manifest.shards]
        self.manifest = dataclasses.replace(first.manifest, num_pairs=sum(len(d) for d in datasets),
                                            shards=tuple(shards), columns=tuple(common),
                                            provenance={"mixture": list(names)})
        self.token_dtype = first.token_dtype
        self._shards = [sh for ds in datasets for sh in ds._live()]
        self._bounds = np.cumsum([0] + [s.num_pairs for s in self.manifest.shards], dtype=np.int64)
        self._joined = {}
        self._tokenizer = None
        self._native_args = None
        self.offsets = np.cumsum([0] + [len(d) for d in datasets], dtype=np.int64)

    def __repr__(self) -> str:
        return f"pairpack.MixtureView({', '.join(f'{n}={len(d)}' for n, d in zip(self.names, self.datasets))})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # type: ignore[override]
        return (_reopen, ([str(d.path) for d in self.datasets], list(self.names)))

    @property
    def tokenizer(self) -> Any:
        """The sources' tokenizer (they share one: a mixture of other tokenizers is refused), for decoding."""
        return self.datasets[0].tokenizer

    def verify(self, *, checksums: bool = True) -> list[str]:
        """Every source's :meth:`Dataset.verify`, each problem prefixed with its source name."""
        return [f"{n}: {p}" for n, d in zip(self.names, self.datasets) for p in d.verify(checksums=checksums)]


def _reopen(paths: list[str], names: list[str]) -> MixtureView:
    return MixtureView([open_dataset(p) for p in paths], names)


_FILL_CHUNK = 1 << 20  # entries of a range written at a time (bounded temporaries)


def _copy_into(dst: np.ndarray, pool: np.ndarray | range) -> None:
    """``dst[:] = pool``; a range is written in chunks, so no full-size temporary is allocated."""
    if not isinstance(pool, range):
        dst[:] = pool
        return
    for a in range(0, len(dst), _FILL_CHUNK):
        b = min(len(dst), a + _FILL_CHUNK)
        dst[a:b] = np.arange(pool.start + a, pool.start + b, dtype=np.int64)


class Mixture:
    """Named sources, their relative weights and the epoch size: what a mixture Loader serves.

    Args:
        sources: name -> :class:`~pairpack.Dataset` or path, in mixture order (names are strings).
        weights: name -> relative weight (``>= 0``, finite, positive sum), or a sequence in the
            order of ``sources``; default: each source's size (every pair once per epoch at the
            default ``epoch_size``).
        epoch_size: pairs per epoch (``>= 1``); default: the sum of the sources' pairs taking part.

    Raises:
        ArgumentError: no source, a bad name, weight or epoch size, or sources whose ids cannot
            be served together (another tokenizer, vocabulary, token dtype or special ids): the
            message names each source's tokenizer.
    """

    def __init__(self, sources: Mapping[str, Dataset | str | os.PathLike], *,
                 weights: Mapping[str, float] | Sequence[float] | None = None,
                 epoch_size: int | None = None) -> None:  # noqa: D107
        if not isinstance(sources, Mapping) or not sources:
            raise ArgumentError("a mixture needs a non-empty mapping of name -> dataset or path")
        names = list(sources)
        for n in names:
            if not isinstance(n, str) or not n:
                raise ArgumentError(f"mixture source names must be non-empty strings, got {n!r}")
        datasets = [d if isinstance(d, Dataset) else open_dataset(d) for d in sources.values()]
        ids = [_identity(d) for d in datasets]
        if any(i != ids[0] for i in ids[1:]):
            lines = "; ".join(f"{n} ({d.path}): {_describe(d)}" for n, d in zip(names, datasets))
            raise ArgumentError(f"mixture sources cannot be served together: their token ids mean different "
                                f"things or have other special ids: {lines}")
        self.names = tuple(names)
        self.view = MixtureView(datasets, names)
        self.weights = self._weights(weights)
        if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, (int, np.integer))
                                       or epoch_size < 1):
            raise ArgumentError(f"epoch_size must be an int >= 1, got {epoch_size!r}")
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        spec = {"names": self.names, "fingerprints": [d.fingerprint for d in datasets],
                "weights": None if self.weights is None else [float(w) for w in self.weights],
                "epoch_size": self.epoch_size}
        self.fingerprint = xxhash.xxh3_128_hexdigest(json.dumps(spec, sort_keys=True).encode())

    def _weights(self, weights: Mapping[str, float] | Sequence[float] | None) -> np.ndarray | None:
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            if set(weights) != set(self.names):
                raise ArgumentError(f"weights must name every source exactly: sources {list(self.names)}, "
                                    f"weights {list(weights)}")
            w = [weights[n] for n in self.names]
        else:
            w = list(weights)
            if len(w) != len(self.names):
                raise ArgumentError(f"weights: {len(w)} values for {len(self.names)} sources")
        try:
            arr = np.asarray(w, dtype=np.float64)
        except (TypeError, ValueError):
            raise ArgumentError(f"weights must be numbers, got {w!r}") from None
        if not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
            raise ArgumentError(f"weights must be finite, >= 0, with a positive sum; got {w!r}")
        return arr / arr.sum()

    @property
    def offsets(self) -> np.ndarray:
        """int64 ``(S + 1,)``: union index of each source's first pair; ``offsets[-1]`` the union size."""
        return self.view.offsets

    def pools(self, valid: np.ndarray | None) -> list[np.ndarray | range]:
        """Per source, the union indices taking part, sorted: a slice of ``valid`` (sorted union
        indices), or a ``range`` over the whole source when ``valid`` is None (nothing allocated)."""
        off = self.offsets.tolist()
        if valid is None:
            return [range(off[s], off[s + 1]) for s in range(len(self.names))]
        cut = np.searchsorted(valid, off).tolist()
        return [valid[cut[s]:cut[s + 1]] for s in range(len(self.names))]

    def counts(self, sizes: Sequence[int]) -> np.ndarray:
        """int64 ``(S,)``: pairs each source gives per epoch, given its pairs taking part (``sizes``)."""
        sizes_a = np.asarray(sizes, dtype=np.int64)
        total = int(sizes_a.sum()) if self.epoch_size is None else self.epoch_size
        w = sizes_a.astype(np.float64) if self.weights is None else self.weights
        if w.sum() <= 0:
            return np.zeros(len(sizes_a), dtype=np.int64)
        out = apportion(total, w)
        empty = np.flatnonzero((out > 0) & (sizes_a == 0))
        if len(empty):
            raise ArgumentError(f"mixture source {self.names[int(empty[0])]!r} has no pair taking part but its "
                                f"weight asks for {int(out[empty[0]])} per epoch")
        return out

    def order(self, valid: np.ndarray | None, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """The epoch's draw: int64 ``(epoch_size,)`` union indices (see the module docstring).

        ``shuffle=False``: each source in dataset order (passes repeat it), the sources
        interleaved evenly by their counts; else one shuffle of the whole draw (in place).
        """
        pools = self.pools(valid)
        counts = self.counts([len(p) for p in pools])
        rng = epoch_rng(seed, epoch, self.fingerprint, _DRAW_STREAM)
        total = int(counts.sum())
        # room for a whole pool after the draw's end: a source's remainder is the head of one more
        # shuffled pass, written in place (no temporaries); the array is shrunk in place afterwards
        room = max([len(p) - c % len(p) for p, c in zip(pools, counts.tolist()) if c and c % len(p)] or [0])
        out = np.empty(total + room, dtype=np.int64)
        k = 0
        for pool, c in zip(pools, counts.tolist()):
            n = len(pool)
            if not c:
                continue
            passes, rest = divmod(c, n)
            for _ in range(passes + (rest > 0)):  # a pass: the pool copied into the draw, shuffled there
                _copy_into(out[k:k + n], pool)
                if shuffle:
                    rng.shuffle(out[k:k + n])
                k += n
            k -= n - rest if rest else 0  # the remainder keeps the head of its pass
        if room:
            out.resize(total, refcheck=False)  # no view of it is alive; realloc shrinks in place
        if shuffle:
            rng.shuffle(out)
            return out
        # even interleave: the j-th of source s's c draws sits at (j + 0.5) / c of the epoch
        pos = np.concatenate([(np.arange(c) + 0.5) / c for c in counts.tolist() if c] or [np.zeros(0)])
        return out[np.argsort(pos, kind="stable")]

    def source_of(self, union_indices: np.ndarray) -> np.ndarray:
        """int64: the source position of each union index."""
        return np.searchsorted(self.offsets, np.asarray(union_indices, dtype=np.int64), side="right") - 1

    def localise(self, batch: Any) -> Any:
        """Give a batch of union indices its ``source`` (int64 ``(B,)``, position of each pair's
        source in :attr:`names`) and make its ``indices`` positions within the source (on the
        batch's device, no host synchronisation)."""
        import torch

        g = batch.indices
        if g.device.type == "cpu":  # numpy: a few microseconds for a batch (torch ops cost ~10x more)
            gn = g.numpy()
            src = np.searchsorted(self.offsets, gn, side="right") - 1
            batch.indices = torch.from_numpy(gn - self.offsets[src])  # new arrays: g may be a plan's view
            batch.source = torch.from_numpy(src)
            return batch
        off = self._offsets_on(g.device)
        src = torch.searchsorted(off, g, right=True) - 1
        batch.indices = g - off[src]
        batch.source = src
        return batch

    def _offsets_on(self, device: "torch.device") -> "torch.Tensor":
        import torch

        cache = self.__dict__.setdefault("_off_t", {})
        key = str(device)
        if key not in cache:
            cache[key] = torch.as_tensor(self.offsets, dtype=torch.int64).to(device)
        return cache[key]

    def describe(self) -> dict[str, Any]:
        """The mixture as recorded in a loader state: names, weights (normalised or None), epoch_size."""
        return {"names": list(self.names),
                "weights": None if self.weights is None else [round(float(w), 12) for w in self.weights],
                "epoch_size": self.epoch_size}
