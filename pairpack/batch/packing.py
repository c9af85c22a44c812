"""Packing pairs into rows (torch-free): shared by the planner (:mod:`.plan`), which sizes batches
from lengths alone, and the batch builder (:mod:`.layouts`), which lays the tokens out."""

from __future__ import annotations

import numpy as np

from .options import OversizeError

__all__ = ["pack_rows", "first_fit_order"]


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


def first_fit_order(need: np.ndarray, cap: int, open_rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pack units into rows of ``cap`` tokens first-fit over the ``open_rows`` newest rows:
    ``(order, bounds)``, the units listed row by row and the row boundaries in that order.

    Next-fit leaves each row up to one unit short; first-fit tops rows up with later, smaller
    units. Listed row by row in placement order, the units pack back into exactly these rows by
    :func:`pack_rows` (each row's first unit did not fit the row opened just before it, which was
    still open), so the batch builder, which re-packs a batch next-fit, agrees with the planner.
    One Python step per unit (planning only, once per epoch), over a few open rows.
    """
    n = len(need)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    if int(need.max()) > cap:
        j = int(np.argmax(need > cap))
        raise OversizeError(f"pair at position {j} needs {int(need[j])} tokens > the row bound of {cap}")
    rows: list[list[int]] = []
    left: list[int] = []  # free tokens of the open rows (the newest open_rows rows)
    first_open = 0
    for i, x in enumerate(need.tolist()):
        for k in range(first_open, len(rows)):
            if left[k - first_open] >= x:
                rows[k].append(i)
                left[k - first_open] -= x
                break
        else:
            rows.append([i])
            left.append(cap - x)
            if len(left) > open_rows:
                left.pop(0)
                first_open += 1
    order = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=n)
    bounds = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return order, bounds
