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

from ._version import __version__
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ChecksumError,
    ColumnNotFoundError,
    DatasetExistsError,
    DeviceError,
    FormatError,
    MissingDependencyError,
    LossConfigError,
    ModelError,
    NotReplaceableError,
    PairIndexError,
    OversizeError,
    PairpackError,
    SourceError,
    StateError,
    TokenizerError,
)
from .format import FORMAT_VERSION
from .read.dataset import Dataset, Pair
from .read.dataset import open_dataset as open  # noqa: A001
from .read.verify import verify_dataset as verify
from .write.writer import Writer

# at most 30 names (tests/test_layering.py); ``pairpack.__version__`` is there too, as in every package
__all__ = [
    "FORMAT_VERSION",
    "open",
    "build",
    "verify",
    "Dataset",
    "Pair",
    "Writer",
    "Triplets",
    "PackedBatch",
    "PlanOptions",
    "Truncation",
    "Loader",
    "Collate",
    "PairpackError",
    "FormatError",
    "ChecksumError",
    "SourceError",
    "TokenizerError",
    "DatasetExistsError",
    "NotReplaceableError",
    "StateError",
    "DeviceError",
    "OversizeError",
    "ModelError",
    "ArgumentError",
    "ArgumentTypeError",
    "ColumnNotFoundError",
    "PairIndexError",
    "MissingDependencyError",
    "LossConfigError",
]


def backend() -> str:
    """``"native"`` when the compiled kernels (``pairpack/_native.c``: batch gather, JSONL id
    reader) are in use, ``"numpy"`` when they are not built or ``PAIRPACK_NATIVE=0`` is set. Both
    give the same bytes; the native one is faster (docs/performance.md)."""
    from . import _accel

    return "native" if _accel.native is not None else "numpy"


def build(*args: Any, **kwargs: Any) -> Any:
    """Build a dataset from preference records: :func:`pairpack.ingest.build.build` (its docstring
    lists the options). A thin wrapper so that ``import pairpack`` does not load the ingest
    pipeline, which a training job never needs."""
    from .ingest.build import build as _build

    return _build(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # the batch types need torch; they load on first use so that `import pairpack` stays light
    if name == "Triplets":
        from .batch.triplets import Triplets

        return Triplets
    if name == "Loader":
        from .batch.loader import Loader

        return Loader
    if name == "Collate":
        from .batch.plan import Collate

        return Collate
    if name == "PackedBatch":
        from .batch.layouts import PackedBatch

        return PackedBatch
    if name in ("PlanOptions", "Truncation"):
        from .batch import options

        return getattr(options, name)
    raise AttributeError(f"module 'pairpack' has no attribute {name!r}")
