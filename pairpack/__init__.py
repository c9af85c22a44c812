"""pairpack: preference pairs for DPO, packed into a memory-mapped format with exact masks.

    >>> import pairpack
    >>> ds = pairpack.open("data/pairs")          # O(1): manifest + memory maps
    >>> ds[0].prompt, ds[0].chosen, ds[0].rejected  # zero-copy numpy views
    >>> batch = ds.batch([0, 5, 7])                # Triplets of torch tensors
    >>> loss = dpo(**batch.as_kwargs())            # x_transformers.dpo.DPO.forward inputs

The on-disk format is specified in spec/FORMAT.md.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ChecksumError,
    DatasetExistsError,
    DeviceError,
    FormatError,
    PairpackError,
    SourceError,
    StateError,
    TokenizerError,
)
from .format import FORMAT_VERSION  # noqa: E402
from .reader import Dataset, Pair, open_dataset as open  # noqa: E402,A001
from .writer import Writer  # noqa: E402
from .build import build  # noqa: E402  (the function shadows the submodule name on purpose)

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "open",
    "Dataset",
    "Pair",
    "Writer",
    "build",
    "Triplets",
    "Loader",
    "Collate",
    "PairpackError",
    "FormatError",
    "ChecksumError",
    "SourceError",
    "TokenizerError",
    "DatasetExistsError",
    "StateError",
    "DeviceError",
    "backend",
]


def backend() -> str:
    """``"native"`` when the compiled kernels (``pairpack/_native.c``: batch gather, JSONL id
    reader) are in use, ``"numpy"`` when they are not built or ``PAIRPACK_NATIVE=0`` is set. Both
    give the same bytes; the native one is faster (README, "Speed")."""
    from . import _accel

    return "native" if _accel.native is not None else "numpy"


def __getattr__(name: str) -> Any:
    # torch-dependent and heavier names load on first use, so `import pairpack` stays light
    if name == "Triplets":
        from .triplets import Triplets

        return Triplets
    if name == "Loader":
        from .loader import Loader

        return Loader
    if name == "Collate":
        from .batching import Collate

        return Collate
    raise AttributeError(f"module 'pairpack' has no attribute {name!r}")
