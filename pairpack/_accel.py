"""The optional compiled kernels (``pairpack/_native.c``), or ``None`` when they are not built.

Every caller keeps a numpy path that gives the same bytes; the kernels only make batches
faster. ``PAIRPACK_NATIVE=0`` in the environment forces the numpy path (tests and benchmarks
compare the two; a user can rule the extension out when debugging). Callers read ``native``
at call time, so tests can switch paths by setting this attribute.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import numpy as np


def _load() -> ModuleType | None:
    if os.environ.get("PAIRPACK_NATIVE", "").strip() == "0":
        return None
    try:
        from . import _native
    except ImportError:  # no compiler at install time: the numpy path serves
        return None
    return _native


native: ModuleType | None = _load()

# the storage dtypes (FORMAT.md §3) the C kernels read, with the largest pad_id each can hold
_NATIVE_MAX = {np.dtype(np.uint16): 0xFFFF, np.dtype(np.uint32): 0xFFFFFFFF}


def native_applies(shards: Sequence[np.ndarray], pad_id: int) -> bool:
    """Whether the C kernel reads these token arrays (all uint16 or all uint32) and pad_id fits."""
    dtype = shards[0].dtype
    hi = _NATIVE_MAX.get(dtype)
    return hi is not None and 0 <= pad_id <= hi and all(t.dtype == dtype for t in shards[1:])
