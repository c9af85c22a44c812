"""Deterministic, rank-aware epoch orders (numpy only; torch.distributed is consulted lazily).

The order of an epoch is a pure function of ``(seed, epoch, dataset fingerprint)``: it does not
depend on the worker count, the machine, or how many batches were drawn before, so a resume only
needs ``(epoch, position)`` and every rank can compute every other rank's share.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError

__all__ = ["epoch_order", "epoch_rng", "plan_seed", "equalize", "resolve_rank"]


def _entropy(seed: int, epoch: int, fingerprint: str, *stream: int) -> list[int]:
    if seed < 0 or epoch < 0:
        raise ArgumentError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    try:
        fp = int(fingerprint, 16)
    except (TypeError, ValueError):
        raise ArgumentError(f"fingerprint must be a hex string, got {fingerprint!r}") from None
    return [int(seed), int(epoch), fp, *map(int, stream)]


def epoch_rng(seed: int, epoch: int, fingerprint: str, stream: int = 0) -> np.random.Generator:
    """A numpy Generator seeded from ``(seed, epoch, fingerprint, stream)`` (PCG64 via SeedSequence).

    ``stream`` separates independent uses within one epoch (0: the pair order, 1: the order of
    length-grouped batches), so they never share random numbers.
    """
    return np.random.default_rng(_entropy(seed, epoch, fingerprint, stream))


def plan_seed(seed: int, epoch: int, fingerprint: str, part: int = 0) -> list[int]:
    """Entropy of the batch plan (stream 1 of :func:`epoch_rng`) of part ``part`` of an epoch: 0
    unless an elastic resume split the epoch, each later part its own stream."""
    return _entropy(seed, epoch, fingerprint, 1, *([part] if part else []))


def epoch_order(n: int, *, seed: int, epoch: int, fingerprint: str, shuffle: bool = True,
                subset: np.ndarray | None = None) -> np.ndarray:
    """The order of an epoch: int64 ``(n,)`` pair indices (or ``subset`` permuted), one per pair.

    Args:
        n: number of pairs in the dataset.
        seed: the run's seed; with ``epoch`` and ``fingerprint`` the only inputs of the permutation.
        epoch: the epoch (0-based).
        fingerprint: the dataset's identity, a hex string (``Dataset.fingerprint``).
        shuffle: False gives ``arange(n)`` (or ``subset`` as given).
        subset: optional int64 array of the pair indices taking part (e.g. without pairs dropped
            by truncation); the permutation is of its positions.
    """
    base = np.arange(n, dtype=np.int64) if subset is None else np.asarray(subset, dtype=np.int64)
    if not shuffle:
        return base.copy()
    return base[epoch_rng(seed, epoch, fingerprint, 0).permutation(len(base))]


def equalize(order: np.ndarray, world_size: int, drop_last: bool) -> np.ndarray:
    """Trim or pad ``order`` to a multiple of ``world_size`` as ``DistributedSampler`` does.

    ``drop_last``: keep the first ``world_size * (len // world_size)`` entries. Otherwise pad to
    ``world_size * ceil(len / world_size)`` by repeating entries from the start (cyclically when
    there are fewer pairs than ranks). Returns int64 ``(world_size * m,)``.
    """
    n = len(order)
    m = n // world_size if drop_last else -(-n // world_size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.resize(np.asarray(order, dtype=np.int64), world_size * m)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from an initialised ``torch.distributed``, else (0, 1).

    Raises ValueError when only one of the two is given or ``rank`` is not in ``[0, world_size)``.
    """
    if rank is None and world_size is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
        except ImportError:  # torch without distributed support
            pass
        if rank is None:
            rank, world_size = 0, 1
    if rank is None or world_size is None:
        raise ArgumentError("give both rank and world_size, or neither (then torch.distributed decides)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ArgumentError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)
