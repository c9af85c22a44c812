"""Packing pairs into rows (torch-free): shared by the planner (:mod:`.plan`), which sizes batches
from lengths alone, and the batch builder (:mod:`.layouts`), which lays the tokens out."""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from .options import OversizeError

__all__ = ["pack_rows", "best_fit_order"]


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


def best_fit_order(need: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack units into rows of ``cap`` tokens best-fit over every row with room: ``(order,
    bounds)``, the units listed row by row (rows in the order they were opened, each row's units in
    placement order) and the row boundaries in that order.

    Each unit goes into the row whose free tokens are the fewest that still hold it, else opens a
    row. Fed units in decreasing size (the planner sorts each length-grouping window so), this is
    best-fit decreasing, whose rows stay within a few percent of the fewest possible; first-fit over
    a few recent rows (this module's earlier rule) left UltraFeedback-like rows of 2,048 tokens
    15% empty, grouped units being all near half the row. A row is opened only when no row had
    room for its first unit, and free room only shrinks, so every row ends with less room than the
    next row's first unit: :func:`pack_rows` (next-fit) rebuilds exactly these rows from the
    listing, as the batch builder does. One Python
    step per unit (planning only, once per epoch), ``O(log rows)`` each plus a list insert; rows
    with no room for the smallest unit leave the search.
    """
    n = len(need)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    if int(need.max()) > cap:
        j = int(np.argmax(need > cap))
        raise OversizeError(f"pair at position {j} needs {int(need[j])} tokens > the row bound of {cap}")
    smallest = int(need.min())
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: rows that can still take a unit
    for i, x in enumerate(need.tolist()):
        k = bisect_left(free, (x, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= x
        else:
            r, room = len(rows), cap - x
            rows.append([i])
        if room >= smallest:
            insort(free, (room, r))
    order = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=n)
    bounds = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return order, bounds
