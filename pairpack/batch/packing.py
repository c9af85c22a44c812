"""Packing pairs into rows (torch-free): shared by the planner (:mod:`.plan`), which sizes batches
from lengths alone, and the batch builder (:mod:`.layouts`), which lays the tokens out."""

from __future__ import annotations

import numpy as np

from .options import OversizeError

__all__ = ["pack_rows"]


def pack_rows(need: np.ndarray, cap: int | None) -> np.ndarray:
    """Row boundaries (int64 ``(R + 1,)``) of the units ``need`` (tokens each, in order) packed
    next-fit into rows of at most ``cap`` tokens (None: one row; 0: one unit per row).

    Next-fit over a fixed order is the fewest rows any order-keeping split can use, and a row
    boundary restarts it, so the planner and the batch builder (which re-packs one batch) agree.
    One ``searchsorted`` per row.
    """
    n = len(need)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    if cap is None:
        return np.array([0, n], dtype=np.int64)
    if cap == 0:
        return np.arange(n + 1, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(need)])
    if int(need.max()) > cap:
        j = int(np.argmax(need > cap))
        raise OversizeError(f"pair at position {j} needs {int(need[j])} tokens > the row bound of {cap}")
    if int(csum[-1]) <= cap:
        return np.array([0, n], dtype=np.int64)
    bounds = [0]
    i = 0
    ss = csum.searchsorted
    while i < n:
        i = int(ss(csum[i] + cap, side="right")) - 1
        bounds.append(i)
    return np.asarray(bounds, dtype=np.int64)
