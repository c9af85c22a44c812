"""Filesystem primitives every writer uses: checksums (FORMAT.md §6), fsync, atomic install (§9 W1),
the check that ``--force`` replaces only a dataset (§9 W8), and clean-up of temporaries that dead
writers left behind."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import xxhash

from ..errors import DatasetExistsError, NotReplaceableError
from .manifest import parse_manifest
from .spec import FORMAT_NAME, MANIFEST_NAME, SHARD_NAME_RE, _HASH_CHUNK

_TMP_TAG = ".pairpack-tmp-"  # temp dirs: ".<name>.pairpack-tmp-<pid>-<hex>" beside the target
_OLD_TAG = ".pairpack-old-"  # a replaced dataset, removed right after the swap

__all__ = ["file_checksum", "temp_path_for", "install_dir", "install_file", "replace_file", "write_manifest",
           "clean_stale_temps", "check_output", "not_a_dataset_because"]

# FORMAT.md §5.1 "format": found by a byte search, so a dataset whose manifest is otherwise damaged
# can still be replaced (rebuilding over a broken dataset is what --force is for)
_FORMAT_MARK = re.compile(rb'"format"\s*:\s*"' + FORMAT_NAME.encode() + rb'"')
_DATASET_ENTRIES = (MANIFEST_NAME, "tokenizer.json", "splits")  # besides shard-NNNNN/ (§3, §5.2, §4.5)


def file_checksum(path: str | os.PathLike,
                  visit: Callable[[memoryview, int], None] | None = None) -> str:
    """xxh3-128 of a file's bytes as 32 hex digits (FORMAT.md §6). Streams; runs near disk speed.

    ``visit(chunk, file_offset)``, when given, sees every chunk (at most 16 MiB, at offsets that
    are multiples of 64) right after it is hashed, so a caller can check the data in the same pass
    (verify does).

    The buffer is sized to the file (rounded up to 64 bytes, capped at 16 MiB): a small file is
    read in one call without allocating 16 MiB, which dominated hashing many small files (the
    mutation fuzzer, 20-fold under AddressSanitizer).
    """
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # one byte over the size, so the first read can return the whole file (the next sees EOF)
        buf = bytearray(min(_HASH_CHUNK, (os.fstat(fd).st_size + 64) // 64 * 64))
        view = memoryview(buf)
        off = 0
        while True:
            if advise is not None:
                # ask for the next chunk now: the disk reads it while this one is hashed
                # (measured cold: ~700-830 MB/s without, ~1000-1180 MB/s with, = `cat` speed)
                advise(fd, off + len(buf), len(buf), os.POSIX_FADV_WILLNEED)
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if visit is not None:
                visit(view[:n], off)
            off += n
    return h.hexdigest()



def _fsync_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, data: bytes, *, tmp_name: str | None = None,
                   on_commit: Callable[[], None] | None = None) -> None:
    """Write ``data`` as ``directory/manifest.json``, durably: parsed back first (a writer never
    emits what a reader refuses), written, fsynced, then the directory fsynced (FORMAT.md §9 W1).

    ``tmp_name``, for a manifest that readers may be reading (an in-place column update, §9 W7):
    the bytes go to that file in ``directory`` first and replace the manifest in one
    ``os.replace``, the commit point; the temp file is removed if anything fails before it.
    ``on_commit()`` runs right after the manifest is in place, before the directory fsync, so a
    caller can stop treating its new files as rollback-able even if that fsync then fails.
    """
    parse_manifest(data)
    path = directory / (tmp_name or MANIFEST_NAME)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if tmp_name:
            os.replace(path, directory / MANIFEST_NAME)
    except BaseException:
        if tmp_name:
            path.unlink(missing_ok=True)
        raise
    if on_commit is not None:
        on_commit()
    _fsync_dir(directory)


def install_file(tmp: Path, target: Path) -> None:
    """Move the finished file ``tmp`` over ``target`` durably: fsync its bytes, rename (atomic: a
    reader sees the old file or the whole new one; an existing file is never rewritten in place,
    FORMAT.md §9 W9), fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def replace_file(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a new file beside ``target``, then :func:`install_file` it over ``target``; on
    failure the temp file is removed and ``target`` is as it was."""
    tmp = temp_path_for(target)
    try:
        write(tmp)
        install_file(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def not_a_dataset_because(target: Path) -> str | None:
    """Why ``target`` is not a dataset that pairpack may replace (FORMAT.md §9 W8), or None.

    Replaceable: a real directory (not a link) holding a regular ``manifest.json`` that declares
    ``"format": "pairpack"``, and nothing else at its top level but shard directories and the
    tokenizer copy. Anything else there (§3.2 allows a user's README) would be deleted with it.
    An empty directory holds nothing to lose (``mkdir out`` before a build) and is replaceable.
    """
    if target.is_symlink():
        return "is a symbolic link, not a dataset directory"
    if not target.is_dir():
        return "is a file, not a dataset directory"
    if next(os.scandir(target), None) is None:
        return None
    manifest = target / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        return f"is a directory without a pairpack {MANIFEST_NAME}"
    with open(manifest, "rb") as f:
        head = f.read(1 << 20)
    if not _FORMAT_MARK.search(head):
        return f"has a {MANIFEST_NAME} that is not a pairpack manifest"
    foreign = sorted(e.name for e in os.scandir(target) if e.name not in _DATASET_ENTRIES
                     and not (SHARD_NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False)))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"holds files pairpack did not write ({', '.join(foreign[:3])}{more})"
    return None


def check_output(target: Path, *, force: bool, what: str = "dataset",
                 not_ours: Callable[[Path], str | None] = not_a_dataset_because) -> None:
    """Raise unless a writer may create or replace ``target``: it is absent, or ``force`` is set
    and ``not_ours(target)`` finds it to be pairpack's own ``what`` (FORMAT.md §9 W8).

    Raises:
        DatasetExistsError: ``target`` exists and ``force`` is False.
        NotReplaceableError: ``force`` is set but ``target`` is not pairpack's (nothing is deleted).
    """
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise DatasetExistsError(target)
    why = not_ours(target)
    if why is not None:
        raise NotReplaceableError(target, why, what)


def temp_path_for(target: Path) -> Path:
    """A fresh temp name (for a directory or a file) beside ``target`` that :func:`clean_stale_temps`
    recognises by its tag and removes once its process is gone."""
    return target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def install_dir(tmp: Path, target: Path, *, force: bool) -> None:
    """Move the finished directory ``tmp`` to ``target`` (FORMAT.md §9 W1).

    Replacing an existing ``target`` (only with ``force``) is one atomic exchange where the kernel
    supports renameat2, so the path always holds a whole dataset; elsewhere two renames.
    """
    if target.exists() or target.is_symlink():
        check_output(target, force=force)  # checked again here: the path may have changed since
        old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if _exchange(tmp, target):  # one atomic step: the path always holds a full dataset
            os.rename(tmp, old)
        else:
            os.rename(target, old)
            os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, target)
        _fsync_dir(target.parent)


def clean_stale_temps(target: Path) -> None:
    """Remove temp directories that dead builds left beside ``target`` (their pid is gone)."""
    parent = target.parent
    if not parent.is_dir():
        return
    # the last tag is the rejects file a killed `build --skip-invalid` was writing (build.py)
    for tag in (_TMP_TAG, _OLD_TAG, ".rejects.jsonl.tmp-"):
        prefix = f".{target.name}{tag}"
        for p in parent.glob(prefix + "*"):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
