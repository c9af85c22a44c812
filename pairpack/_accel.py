"""The optional compiled kernels (``pairpack/_native.c``), or ``None`` when they are not built.

Every caller keeps a numpy path that gives the same bytes; the kernels only make batches
faster. ``PAIRPACK_NATIVE=0`` in the environment forces the numpy path (tests and benchmarks
compare the two; a user can rule the extension out when debugging). Callers read ``native``
at call time, so tests can switch paths by setting this attribute.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("PAIRPACK_NATIVE", "").strip() == "0":
        return None
    try:
        from . import _native
    except ImportError:  # no compiler at install time: the numpy path serves
        return None
    return _native


native: ModuleType | None = _load()
