"""Adding per-pair columns to an existing dataset (FORMAT.md §4.4, §9 W7) without touching any file
that a reader may hold open."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import xxhash

from .. import format as fmt
from ..errors import ArgumentError, FormatError
from ..format.fsio import _fsync_dir, _pid_alive, write_manifest
from .writer import _file_entry

__all__ = ["add_columns"]

# add_columns names each new column file after its content, "<name>.<16 hex of its xxh3-128>.npy",
# so a new file never overwrites a file that the current manifest points to: readers holding the
# old manifest keep a consistent view until the old files are deleted, after the manifest swap.
_COLFILE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\.[0-9a-f]{16}\.npy$")
_COLTMP_TAG = ".pairpack-coltmp-"  # temp files: ".<name>.pairpack-coltmp-<pid>-<hex>"


@contextlib.contextmanager
def _dataset_lock(root: Path) -> Iterator[None]:
    """Exclusive advisory lock on the dataset directory (flock on its fd): one column update at a time."""
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise FormatError("not a dataset directory", path=root, field="manifest", section="§3") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the fd releases the lock


def _column_array(name: str, values: Any, num_pairs: int) -> np.ndarray:
    if not fmt.COLUMN_NAME_RE.match(name):
        raise ArgumentError(f"bad column name {name!r}: names match [a-z][a-z0-9_]{{0,63}} (FORMAT.md §4.4)")
    if hasattr(values, "detach"):  # a torch tensor: numpy view of its CPU copy
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    dt_name = arr.dtype.name if arr.dtype.kind in "fi" else ""
    if dt_name not in fmt.COLUMN_DTYPES:
        raise ArgumentError(f"column {name!r}: dtype {arr.dtype} is not allowed; use one of "
                         f"{sorted(fmt.COLUMN_DTYPES)} (FORMAT.md §4.4)")
    if arr.shape != (num_pairs,):
        raise ArgumentError(f"column {name!r}: shape {arr.shape} differs from (num_pairs,) = ({num_pairs},)")
    arr = np.ascontiguousarray(arr, dtype=fmt.COLUMN_DTYPES[dt_name])  # little-endian, C order
    if arr.dtype.kind == "f" and num_pairs and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ArgumentError(f"column {name!r}: non-finite value {arr[bad]} at pair {bad} (FORMAT.md §8 R16)")
    return arr


def _write_column_file(shard_dir: Path, name: str, data: np.ndarray, created: list[Path]) -> Path:
    """Write ``data`` as a content-named .npy in ``shard_dir`` via a temp file; return its path."""
    header = fmt.npy_header(data.dtype, data.shape)
    h = xxhash.xxh3_128()
    h.update(header)
    h.update(memoryview(data).cast("B"))
    digest = h.hexdigest()
    final = shard_dir / f"{name}.{digest[:16]}.npy"
    tmp = shard_dir / f".{name}{_COLTMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    created.append(tmp)
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    existed = final.exists()
    os.replace(tmp, final)  # same name => same bytes: replacing an identical file changes nothing
    created.remove(tmp)
    if not existed:
        created.append(final)
    return final


def _collect_garbage(root: Path, manifest: fmt.Manifest) -> None:
    """Delete column files no manifest entry points to and temp files of dead processes.

    Only names that add_columns itself creates are touched (content-named column files and its
    temp files), so files written by other tools are never removed.
    """
    live = {e.path for s in manifest.shards for e in s.columns.values()}
    dirs = [root] + [root / s.name for s in manifest.shards]
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for fn in names:
            p = d / fn
            if _COLTMP_TAG in fn:
                try:
                    pid = int(fn.split(_COLTMP_TAG, 1)[1].split("-")[0])
                except ValueError:
                    continue
                if pid != os.getpid() and not _pid_alive(pid):
                    p.unlink(missing_ok=True)
            elif d != root and _COLFILE_RE.match(fn) and p.relative_to(root).as_posix() not in live:
                p.unlink(missing_ok=True)


def add_columns(
    path: str | os.PathLike,
    columns: Mapping[str, Any],
    *,
    info: Mapping[str, Mapping[str, Any]] | None = None,
) -> fmt.Manifest:
    """Add or replace per-pair columns of an existing dataset, atomically (FORMAT.md §4.4, §9).

    Each column is split over the shards and written as one ``.npy`` per shard, named after
    its content (``shard-NNNNN/<name>.<16 hex of its xxh3-128>.npy``), fsynced, checksummed;
    then ``manifest.json`` is replaced in one ``os.replace`` of a fsynced temp file. Only after
    that are the files of replaced columns deleted. At every instant the manifest on disk
    points only at complete files with the checksums it records: an interrupted call leaves
    the dataset as it was (plus at most unreferenced files, removed by the next call). The
    token and index files are untouched, so the fingerprint (§7.3) does not change. Column
    updates of one dataset are serialised by an advisory lock on its directory.

    Args:
        path: the dataset directory.
        columns: name -> values, one per pair: ``(num_pairs,)`` numpy array or torch tensor of
            float32, float64, int32 or int64 (FORMAT.md §4.4). Floats must be finite (§8 R16).
            A name that exists already is replaced.
        info: optional name -> ``{"description": str, "attrs": dict}`` (attrs JSON values).
            A replaced column without info gets empty ones: old attrs never describe new values.

    Returns:
        The new :class:`~pairpack.format.Manifest`. Open the dataset again to read the columns
        (a :class:`~pairpack.read.dataset.Dataset` opened before keeps its old view).

    Raises:
        ValueError: a bad name, dtype, shape, non-finite value, or attrs that are not JSON.
        FormatError: ``path`` is not a readable dataset.
    """
    root = Path(path)
    info = dict(info or {})
    unknown = set(info) - set(columns)
    if unknown:
        raise ArgumentError(f"info given for columns not being added: {sorted(unknown)}")
    with _dataset_lock(root):
        old = fmt.read_manifest(root)
        arrays = {k: _column_array(k, v, old.num_pairs) for k, v in columns.items()}
        new_cols = {c.name: c for c in old.columns}
        for k, arr in arrays.items():
            meta = dict(info.get(k, {}))
            new_cols[k] = fmt.ColumnInfo(k, arr.dtype.name, str(meta.get("description", "")),
                                         dict(meta.get("attrs", {})))
        created: list[Path] = []
        try:
            shards = []
            lo = 0
            for s in old.shards:
                shard_dir = fmt.resolve_file(root, s.name)
                entries = dict(s.columns)
                for k, arr in arrays.items():
                    p = _write_column_file(shard_dir, k, arr[lo:lo + s.num_pairs], created)
                    entries[k] = _file_entry(root, p)
                lo += s.num_pairs
                shards.append(fmt.ShardInfo(s.name, s.num_pairs, s.num_tokens, s.num_prompts, s.files, entries))
                _fsync_dir(shard_dir)
            manifest = dataclasses.replace(old, shards=tuple(shards),
                                           columns=tuple(new_cols[k] for k in sorted(new_cols)))
            try:
                data = manifest.dumps()
            except (TypeError, ValueError) as e:
                raise ArgumentError(f"column attrs must be JSON values ({e})") from None
            # the commit point: one os.replace of the fsynced new manifest; from then on the new
            # files are the dataset's, never rolled back
            tmp_name = f".{fmt.MANIFEST_NAME}{_COLTMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            write_manifest(root, data, tmp_name=tmp_name, on_commit=created.clear)
        except BaseException:
            for p in created:  # new files only: nothing the old manifest points to
                p.unlink(missing_ok=True)
            raise
        # the old manifest is gone: drop the files of replaced columns, then any leftovers
        live = {e.path for s in manifest.shards for e in s.columns.values()}
        for s in old.shards:
            for k in arrays:
                e = s.columns.get(k)
                if e is not None and e.path not in live:
                    fmt.resolve_file(root, e.path).unlink(missing_ok=True)
        _collect_garbage(root, manifest)
    return manifest
