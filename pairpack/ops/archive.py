"""``pairpack pack`` / ``pairpack unpack``: a dataset as one compressed, checksummed, streamable file.

Layout of ``NAME.pairpack.zst`` (version 1): one zstandard frame (with its content checksum),
then a 36-byte trailer. The frame holds a tar stream (GNU format, regular files only) whose members
are, in order:

1. ``pairpack-archive.json``: the archive header, ``{"format": "pairpack-archive", "version": 1,
   "num_pairs", "fingerprint", "members": [{"path", "bytes", "xxh3_128"}, ...]}``. It lists every
   member that follows, the manifest included, so an unpacker knows the exact member set, sizes and
   checksums before it reads any data.
2. ``manifest.json``: the dataset manifest, byte for byte (its own xxh3-128 is in the header).
3. every file the manifest lists (index files, then columns, shard by shard), byte for byte.

The trailer is a zstd *skippable frame* (so ``zstd -d`` ignores it and ``zstd -dc F | tar x`` works)
holding ``b"PPAK"``, the byte length of the compressed frame (uint64 LE) and its xxh3-128 (16 bytes,
big-endian digest): it detects a truncated file, trailing bytes, and damage anywhere in the
compressed bytes, including the parts the members' checksums cannot see.

The data files' checksums in the header are the manifest's own (FORMAT.md §6): :func:`pack` hashes
each file as it streams it and refuses to ship a file that no longer matches its manifest.
:func:`unpack` hashes every member as it streams it, checks the manifest against the header, refuses
anything that is not a regular file at a known path, then checks the dataset's invariants and moves
it into place atomically (a temporary directory beside the target and one rename); on any failure
nothing is left behind. Only files named by the manifest travel: anything else in the dataset
directory stays home.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
import zstandard

from .. import format as fmt
from ..errors import ChecksumError, FormatError
from ..format.fsio import _fsync_dir, check_output, clean_stale_temps, install_dir, install_file, temp_path_for
from ..read.dataset import open_dataset

__all__ = ["pack", "unpack", "ArchiveReport", "ARCHIVE_FORMAT", "ARCHIVE_VERSION", "ARCHIVE_SUFFIX"]

ARCHIVE_FORMAT = "pairpack-archive"
"""The archive header's ``"format"`` value."""
ARCHIVE_VERSION = 1
"""The archive header's ``"version"`` value."""
ARCHIVE_SUFFIX = ".pairpack.zst"
"""The conventional ending of an archive's file name."""
HEADER_NAME = "pairpack-archive.json"  # the first member
HEADER_MAX_BYTES = 2 * fmt.MANIFEST_MAX_BYTES  # unpack refuses a larger header unread
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TRAILER_MAGIC = 0x184D2A5E  # one of the zstd skippable-frame magics (0x184D2A50..5F): decoders skip it
TRAILER_TAG = b"PPAK"
_TRAILER = struct.Struct("<II4sQ16s")  # magic, payload size (28), tag, frame bytes, xxh3-128 of the frame
_BLOCK = tarfile.BLOCKSIZE  # 512
_CHUNK = 8 << 20  # bytes per read/write while streaming a member
_MAX_TAIL = 1 << 20  # zero padding accepted after the end-of-archive marker (tar pads to records)
_MAX_NAME = 4096  # longest member name (GNU long-name member) unpack accepts


@dataclass
class ArchiveReport:
    """What a pack or unpack did: sizes in bytes, time in seconds.

    ``data_bytes`` counts the dataset's files (manifest included), ``archive_bytes`` the compressed
    file; ``ratio`` is data / archive and ``mb_per_s`` is dataset MB (10**6 bytes) per second.
    """

    action: str  # "packed" or "unpacked"
    dataset: str
    archive: str
    members: int
    num_pairs: int
    data_bytes: int
    archive_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        """Dataset bytes over archive bytes (the compression ratio)."""
        return self.data_bytes / max(self.archive_bytes, 1)

    @property
    def mb_per_s(self) -> float:
        """Dataset megabytes (10^6 bytes) per second of the whole command."""
        return self.data_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One human line: what, sizes, ratio, speed."""
        data, arch = f"{self.data_bytes / 1e6:,.2f} MB", f"{self.archive_bytes / 1e6:,.2f} MB compressed"
        if self.action == "packed":
            head = f"packed {self.dataset} -> {self.archive}: {data} -> {arch}"
        else:
            head = f"unpacked {self.archive} -> {self.dataset}: {arch} -> {data}, every checksum verified"
        return (f"{head}\n  {self.num_pairs:,} pairs, {self.members} files, ratio {self.ratio:.2f}x, "
                f"{self.seconds:.2f} s, {self.mb_per_s:,.1f} MB/s of dataset")

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (the fields plus ``ratio`` and ``mb_per_s``)."""
        d = dict(self.__dict__)
        d["ratio"] = self.ratio
        d["mb_per_s"] = self.mb_per_s
        return d


# --- pack ----------------------------------------------------------------------------------------
def _tar_header(name: str, size: int) -> bytes:
    """A GNU tar header for a regular file with fixed, reproducible metadata (mode 0644, mtime 0)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def _pad(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def pack(dataset: str | os.PathLike, output: str | os.PathLike, *, level: int = 3, threads: int = -1,
         force: bool = False) -> ArchiveReport:
    """Write the dataset at ``dataset`` into the single compressed archive ``output``.

    Args:
        dataset: a pairpack dataset directory.
        output: the archive file to create (conventionally ``NAME.pairpack.zst``), written to a
            temporary file beside it and renamed into place when complete.
        level: zstandard level (1-22; 3 is fast, 19 is small and slow).
        threads: compression threads; -1 uses every core.
        force: replace an existing ``output``.

    Raises:
        DatasetExistsError: ``output`` exists and ``force`` is False.
        NotReplaceableError: ``force`` is set but ``output`` is not pairpack's (§9 W8).
        FormatError / ChecksumError: the dataset is damaged (a file differs from its manifest entry).
    """
    root = Path(dataset)
    out = Path(output)
    check_output(out, force=force, what="archive", not_ours=_not_an_archive_because)
    t0 = time.perf_counter()
    manifest_path = root / fmt.MANIFEST_NAME
    fmt.read_manifest(root)  # a clear "not a dataset" error before anything else
    with open(manifest_path, "rb") as f:
        manifest_bytes = f.read(fmt.MANIFEST_MAX_BYTES + 1)
    m = fmt.parse_manifest(manifest_bytes, manifest_path)
    entries = m.files()
    members = [{"path": fmt.MANIFEST_NAME, "bytes": len(manifest_bytes),
                fmt.CHECKSUM_KEY: xxhash.xxh3_128_hexdigest(manifest_bytes)}]
    members += [e.to_json() for e in entries]
    header = (json.dumps({"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "num_pairs": m.num_pairs,
                          "fingerprint": m.fingerprint(), "members": members}, indent=1, sort_keys=True)
              + "\n").encode()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    data_bytes = len(manifest_bytes)
    try:
        with open(tmp, "xb") as raw:
            sink = _HashingSink(raw)
            cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
            with cctx.stream_writer(sink, closefd=False) as z:
                for name, payload in ((HEADER_NAME, header), (fmt.MANIFEST_NAME, manifest_bytes)):
                    z.write(_tar_header(name, len(payload)) + payload + _pad(len(payload)))
                for e in entries:
                    data_bytes += _pack_file(z, fmt.resolve_file(root, e.path), e)
                z.write(b"\0" * (2 * _BLOCK))  # tar end-of-archive marker
            raw.write(_TRAILER.pack(TRAILER_MAGIC, _TRAILER.size - 8, TRAILER_TAG, sink.n, sink.h.digest()))
        archive_bytes = tmp.stat().st_size
        install_file(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ArchiveReport("packed", str(root), str(out), len(members), m.num_pairs, data_bytes,
                         archive_bytes, time.perf_counter() - t0)


class _HashingSink:
    """A write-only file object that counts and hashes what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = xxhash.xxh3_128()
        self.n = 0

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class _FrameSource:
    """A read-only view of the first ``limit`` bytes of ``f`` (the compressed frame) that hashes
    what the decompressor reads."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.left = limit
        self.h = xxhash.xxh3_128()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        b = self.f.read(n) if n else b""
        self.left -= len(b)
        self.h.update(b)
        return b

    def drain(self) -> int:
        """Hash whatever the decompressor left unread; returns how many bytes that was."""
        extra = 0
        while self.left:
            b = self.read(_CHUNK)
            if not b:
                break
            extra += len(b)
        return extra


def _pack_file(z: Any, path: Path, entry: fmt.FileEntry) -> int:
    """Stream one data file into the tar stream ``z``, checking its size and checksum against
    its manifest entry (the archive never ships a file its manifest would refuse)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FormatError("file is missing", path=path, field=entry.path, section="§8 R4") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.bytes:
            raise ChecksumError("file size differs from the manifest", path=path, field=entry.path,
                                expected=entry.bytes, actual=size, section="§8 R5")
        z.write(_tar_header(entry.path, size))
        h = xxhash.xxh3_128()
        left = size
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise FormatError("file shrank while being packed", path=path, field=entry.path)
            h.update(chunk)
            z.write(chunk)
            left -= len(chunk)
        z.write(_pad(size))
    if h.hexdigest() != entry.checksum:
        raise ChecksumError("checksum mismatch: the dataset is damaged; not packing it", path=path,
                            field=entry.path, expected=entry.checksum, actual=h.hexdigest(), section="§8 R12")
    return size


# --- unpack --------------------------------------------------------------------------------------
class _Reader:
    """Exact-size reads from the decompressed stream; a short read is a truncated archive."""

    def __init__(self, stream: BinaryIO, archive: Path) -> None:
        self.stream = stream
        self.archive = archive

    def read(self, n: int, what: str) -> bytes:
        parts = []
        left = n
        while left:
            try:
                b = self.stream.read(min(left, _CHUNK))
            except zstandard.ZstdError as e:
                raise FormatError(f"compressed data is damaged ({e})", path=self.archive, field=what) from None
            if not b:
                raise FormatError(f"archive is truncated: expected {n:,} more bytes", path=self.archive,
                                  field=what)
            parts.append(b)
            left -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def expect_end(self) -> None:
        """Only zero padding (at most ``_MAX_TAIL`` bytes) may follow the end-of-archive marker."""
        seen = 0
        while True:
            try:
                b = self.stream.read(_CHUNK)
            except zstandard.ZstdError as e:
                raise FormatError(f"compressed data is damaged ({e})", path=self.archive, field="end") from None
            if not b:
                return
            seen += len(b)
            if b.strip(b"\0") or seen > _MAX_TAIL:
                raise FormatError("unexpected data after the end of the archive", path=self.archive, field="end")


def _next_member(r: _Reader, archive: Path, index: int) -> tarfile.TarInfo | None:
    """The next tar header, or None at the end-of-archive marker. Only regular files pass."""
    what = f"member {index} header"
    buf = r.read(_BLOCK, what)
    if buf == b"\0" * _BLOCK:
        return None
    info = _parse_tar_header(buf, archive, what)
    if info.type == tarfile.GNUTYPE_LONGNAME:  # pack writes one for a path over 100 bytes
        if info.size > _MAX_NAME:
            raise FormatError("member name is too long", path=archive, field=what,
                              expected=f"<= {_MAX_NAME} bytes", actual=info.size)
        raw = r.read(info.size + (-info.size % _BLOCK), what)[: info.size].rstrip(b"\0")
        info = _parse_tar_header(r.read(_BLOCK, what), archive, what)
        try:
            info.name = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"member name is not UTF-8 ({e})", path=archive, field=what) from None
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
                tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a fifo"}.get(
            info.type, f"type {info.type!r}")
        raise FormatError(f"member {info.name!r} is {kind}; a pairpack archive holds regular files only",
                          path=archive, field=f"member {index}")
    return info


def _parse_tar_header(buf: bytes, archive: Path, what: str) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(buf, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"bad tar header ({e})", path=archive, field=what) from None


def unpack(archive: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
           verify: bool = True) -> ArchiveReport:
    """Recreate the dataset stored in ``archive`` at ``output``, checking every member.

    Each member's size and xxh3-128 are checked against the archive header as it streams; the
    manifest must match the header; with ``verify`` the dataset's invariants (FORMAT.md §8
    R13-R16) are checked before it is moved into place. On any failure nothing is left behind
    and an existing ``output`` is untouched.

    Raises:
        DatasetExistsError: ``output`` exists and ``force`` is False.
        NotReplaceableError: ``force`` is set but ``output`` is not pairpack's (§9 W8).
        FormatError / ChecksumError: the archive is damaged, truncated, or not a pairpack archive
            (``path`` is the archive, ``field`` the member at fault).
    """
    src = Path(archive)
    target = Path(output)
    check_output(target, force=force)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = temp_path_for(target)
    tmp.mkdir()
    try:
        with open(src, "rb") as raw:
            frame_bytes, digest = _read_trailer(raw, src)
            source = _FrameSource(raw, frame_bytes)
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(source, read_size=1 << 20, closefd=False) as zr:
                header, data_bytes = _unpack_members(_Reader(zr, src), src, tmp)
            if source.drain():
                raise FormatError("bytes after the end of the compressed data", path=src, field="frame")
            if source.h.digest() != digest:
                raise ChecksumError("checksum mismatch: the compressed data is damaged", path=src,
                                    field="trailer.xxh3_128", expected=digest.hex(), actual=source.h.hexdigest())
        if verify:
            with open_dataset(tmp) as ds:
                problems = ds.verify(checksums=False)  # checksums were checked while streaming
            if problems:
                raise FormatError("unpacked dataset breaks the format: " + "; ".join(problems[:3]),
                                  path=src, field="dataset")
        _fsync_tree(tmp)
        install_dir(tmp, target, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ArchiveReport("unpacked", str(target), str(src), len(header["members"]), int(header["num_pairs"]),
                         data_bytes, src.stat().st_size, time.perf_counter() - t0)


def _not_an_archive_because(path: Path) -> str | None:
    """Why ``pack --force`` may not replace ``path`` (FORMAT.md §9 W8), or None: it must be a
    regular file that starts as zstandard and ends with pairpack's trailer, i.e. one pack wrote."""
    if path.is_symlink() or not path.is_file():
        return "is not a regular file"
    try:
        with open(path, "rb") as raw:
            _read_trailer(raw, path)
    except FormatError:
        return "is not a pairpack archive (no zstandard magic or no pairpack trailer)"
    return None


def _read_trailer(raw: BinaryIO, archive: Path) -> tuple[int, bytes]:
    """Check the zstd magic and the trailer; return (compressed frame bytes, its xxh3-128 digest)."""
    if raw.read(4) != ZSTD_MAGIC:
        raise FormatError("not a zstandard file: not a pairpack archive", path=archive, field="magic",
                          expected=ZSTD_MAGIC.hex())
    size = os.fstat(raw.fileno()).st_size
    bad = size < 4 + _TRAILER.size
    if not bad:
        raw.seek(size - _TRAILER.size)
        magic, payload, tag, frame_bytes, digest = _TRAILER.unpack(raw.read(_TRAILER.size))
        bad = (magic != TRAILER_MAGIC or payload != _TRAILER.size - 8 or tag != TRAILER_TAG
               or frame_bytes != size - _TRAILER.size)
    if bad:
        raise FormatError("no pairpack trailer at the end: the archive is truncated, has bytes appended, "
                          "or was not written by pairpack pack", path=archive, field="trailer")
    raw.seek(0)
    return frame_bytes, digest


def _parse_header(data: bytes, archive: Path) -> dict[str, Any]:
    try:
        h = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"archive header is not valid JSON ({e})", path=archive, field=HEADER_NAME) from None
    if not isinstance(h, dict) or h.get("format") != ARCHIVE_FORMAT:
        raise FormatError("not a pairpack archive", path=archive, field=f"{HEADER_NAME}.format",
                          expected=ARCHIVE_FORMAT, actual=h.get("format") if isinstance(h, dict) else None)
    if h.get("version") != ARCHIVE_VERSION:
        raise FormatError("unsupported archive version; upgrade pairpack to unpack it", path=archive,
                          field=f"{HEADER_NAME}.version", expected=ARCHIVE_VERSION, actual=h.get("version"))
    members = h.get("members")
    n = h.get("num_pairs")
    if not isinstance(members, list) or not members or isinstance(n, bool) or not isinstance(n, int):
        raise FormatError("header needs a non-empty members list and num_pairs", path=archive, field=HEADER_NAME)
    seen = set()
    for i, e in enumerate(members):
        where = f"{HEADER_NAME}.members[{i}]"
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("bytes")) is int
              and 0 <= e["bytes"] < 1 << 62 and isinstance(e.get(fmt.CHECKSUM_KEY), str))
        if not ok:
            raise FormatError("member entry needs path, bytes and xxh3_128", path=archive, field=where)
        fmt.check_relpath(e["path"], archive, where + ".path")  # no absolute paths, no '..'
        if e["path"] in seen or e["path"] == HEADER_NAME:
            raise FormatError("duplicate member path", path=archive, field=where, actual=e["path"])
        seen.add(e["path"])
    if members[0]["path"] != fmt.MANIFEST_NAME:
        raise FormatError("the first listed member must be the manifest", path=archive,
                          field=f"{HEADER_NAME}.members[0]", expected=fmt.MANIFEST_NAME, actual=members[0]["path"])
    return h


def _unpack_members(r: _Reader, archive: Path, tmp: Path) -> tuple[dict[str, Any], int]:
    """Stream every member into ``tmp``, checking names, sizes and checksums; returns the header
    and the data bytes written."""
    first = _next_member(r, archive, 0)
    if first is None or first.name != HEADER_NAME:
        raise FormatError("not a pairpack archive (first member is not the archive header)", path=archive,
                          field="member 0", expected=HEADER_NAME, actual=None if first is None else first.name)
    if first.size > HEADER_MAX_BYTES:
        raise FormatError("archive header is larger than the cap", path=archive, field=HEADER_NAME,
                          expected=f"<= {HEADER_MAX_BYTES}", actual=first.size)
    header = _parse_header(r.read(first.size, HEADER_NAME), archive)
    r.read(-first.size % _BLOCK, HEADER_NAME)
    expected = header["members"]
    data_bytes = 0
    for i, want in enumerate(expected, start=1):
        info = _next_member(r, archive, i)
        if info is None:
            raise FormatError(f"archive ends before member {want['path']!r}: truncated", path=archive,
                              field=f"member {i}", expected=want["path"])
        if info.name != want["path"] or info.size != want["bytes"]:
            raise FormatError("member differs from the archive header", path=archive, field=f"member {i}",
                              expected=f"{want['path']} ({want['bytes']} bytes)",
                              actual=f"{info.name} ({info.size} bytes)")
        dest = tmp / want["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = xxhash.xxh3_128()
        with open(dest, "xb") as f:  # exclusive: never follows or overwrites anything
            left = info.size
            while left:
                chunk = r.read(min(left, _CHUNK), want["path"])
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        r.read(-info.size % _BLOCK, want["path"])
        if h.hexdigest() != want[fmt.CHECKSUM_KEY]:
            raise ChecksumError("checksum mismatch: the archive is damaged", path=archive, field=want["path"],
                                expected=want[fmt.CHECKSUM_KEY], actual=h.hexdigest())
        data_bytes += info.size
        if i == 1:
            _check_manifest_matches(tmp, header, archive)
    if _next_member(r, archive, len(expected) + 1) is not None:
        raise FormatError("archive holds members its header does not list", path=archive,
                          field=f"member {len(expected) + 1}")
    r.read(_BLOCK, "end-of-archive marker")  # the second zero block
    r.expect_end()
    return header, data_bytes


def _check_manifest_matches(tmp: Path, header: dict[str, Any], archive: Path) -> None:
    """The header's member list must be exactly the manifest's files, with the manifest's sizes and
    checksums: the manifest (hash-checked against the header) vouches for every data member."""
    m = fmt.read_manifest(tmp)
    files = {e.path: e for e in m.files()}
    listed = {e["path"]: e for e in header["members"][1:]}
    if set(files) != set(listed):
        raise FormatError("archive members differ from the files the manifest lists", path=archive,
                          field=HEADER_NAME, expected=sorted(files), actual=sorted(listed))
    for p, e in files.items():
        if listed[p]["bytes"] != e.bytes or listed[p][fmt.CHECKSUM_KEY] != e.checksum:
            raise ChecksumError("archive header and manifest disagree", path=archive, field=p,
                                expected=e.checksum, actual=listed[p][fmt.CHECKSUM_KEY])
    if header.get("num_pairs") != m.num_pairs:
        raise FormatError("archive header and manifest disagree", path=archive, field="num_pairs",
                          expected=m.num_pairs, actual=header.get("num_pairs"))


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))
