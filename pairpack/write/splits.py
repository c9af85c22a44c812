"""Recording named splits in an existing dataset (FORMAT.md §4.5, §5.6), atomically, the way
columns are added (§9 W7): content-named files, then one manifest swap; the pairs are untouched."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .. import format as fmt
from ..errors import ArgumentError, StateError
from ..format.fsio import _fsync_dir, write_manifest
from .columns import _COLTMP_TAG, _dataset_lock, _write_column_file
from .writer import _file_entry

__all__ = ["SplitSpec", "write_splits"]


class SplitSpec(NamedTuple):
    """One split to record: ``name`` (§5.6 pattern), ``indices`` (int64 ``(k,)`` strictly increasing
    pair indices), how it was drawn (``by``, ``seed``) and its distinct prompts (``num_prompts``)."""

    name: str
    indices: np.ndarray
    by: str
    seed: int
    num_prompts: int


def _checked(spec: SplitSpec, num_pairs: int) -> np.ndarray:
    if not fmt.SPLIT_NAME_RE.fullmatch(spec.name):
        raise ArgumentError(f"bad split name {spec.name!r}: names match [a-z][a-z0-9_]{{0,63}} (FORMAT.md §5.6)")
    if spec.by not in fmt.SPLIT_BY:
        raise ArgumentError(f"split {spec.name!r}: by must be one of {list(fmt.SPLIT_BY)}, got {spec.by!r}")
    idx = np.ascontiguousarray(spec.indices, dtype=fmt.SPLIT_DTYPE)
    if idx.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= num_pairs or (np.diff(idx) <= 0).any())):
        raise ArgumentError(f"split {spec.name!r}: indices must be strictly increasing pair indices in "
                            f"[0, {num_pairs}) (FORMAT.md §4.5)")
    if not 0 <= spec.num_prompts <= idx.size:
        raise ArgumentError(f"split {spec.name!r}: num_prompts {spec.num_prompts} not in [0, {idx.size}]")
    return idx


def write_splits(path: str | os.PathLike, splits: Sequence[SplitSpec], *, fingerprint: str | None = None
                 ) -> fmt.Manifest:
    """Replace the dataset's splits by ``splits``, atomically (FORMAT.md §4.5, §5.6, §9 W7).

    Each split's indices go to ``splits/<name>.<16 hex of its xxh3-128>.npy`` (fsynced,
    checksummed), then ``manifest.json`` is replaced in one ``os.replace``; the files of the old
    splits are deleted only after that. An interrupted call leaves the dataset as it was. Token,
    index and column files are untouched, so the fingerprint (§7.3) does not change.

    Args:
        path: the dataset directory.
        splits: the complete new set of splits (names distinct; pairwise disjoint is the caller's
            rule, checked by ``verify``).
        fingerprint: when given, refuse (StateError) if the dataset's pairs changed since the
            splits were computed.

    Returns:
        The new manifest.
    """
    root = Path(path)
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ArgumentError(f"split names must be distinct, got {names}")
    with _dataset_lock(root):
        old = fmt.read_manifest(root)
        if fingerprint is not None and old.fingerprint() != fingerprint:
            raise StateError(f"{root}: the dataset changed while its splits were computed; run the split again")
        arrays = [_checked(s, old.num_pairs) for s in splits]
        created: list[Path] = []
        try:
            d = root / fmt.SPLITS_DIR
            d.mkdir(exist_ok=True)
            entries = []
            for s, idx in zip(splits, arrays):
                p = _write_column_file(d, s.name, idx, created)
                entries.append(fmt.SplitInfo(s.name, s.by, int(s.seed), int(idx.size), int(s.num_prompts),
                                             _file_entry(root, p)))
            _fsync_dir(d)
            manifest = dataclasses.replace(old, splits=tuple(entries))
            tmp_name = f".{fmt.MANIFEST_NAME}{_COLTMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            write_manifest(root, manifest.dumps(), tmp_name=tmp_name, on_commit=created.clear)
        except BaseException:
            for p in created:  # new files only: nothing the old manifest points to
                p.unlink(missing_ok=True)
            raise
        live = {s.file.path for s in manifest.splits}
        for s in old.splits:
            if s.file.path not in live:
                fmt.resolve_file(root, s.file.path).unlink(missing_ok=True)
    return manifest
