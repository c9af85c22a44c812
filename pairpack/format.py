"""The pairpack on-disk format in code: constants, manifest schema, validation, ``.npy`` I/O.

spec/FORMAT.md is normative; this module implements it and each constant names the section
that defines it. Nothing here reads token data: validation of whole arrays lives in
:mod:`pairpack.reader` (cheap, on open) and :func:`pairpack.reader.Dataset.verify` (full).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import xxhash

from .errors import ChecksumError, FormatError

# --- §2 identity and versioning -------------------------------------------------------------
FORMAT_NAME = "pairpack"  # FORMAT.md §2: value of manifest "format"
FORMAT_VERSION = 1  # FORMAT.md §2: value of manifest "format_version"; independent of the package
MANIFEST_NAME = "manifest.json"  # FORMAT.md §3
MANIFEST_MAX_BYTES = 64 * 1024 * 1024  # FORMAT.md §5: readers refuse a larger manifest unparsed

# --- §3 layout ------------------------------------------------------------------------------
SHARD_NAME_RE = re.compile(r"^shard-[0-9]{5,}$")  # FORMAT.md §3: shard directory names
COLUMN_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # FORMAT.md §4.4: per-pair column names
TOKENS_FILE = "tokens.npy"  # FORMAT.md §4.1
STARTS_FILE = "starts.npy"  # FORMAT.md §4.2
LENGTHS_FILE = "lengths.npy"  # FORMAT.md §4.3
INDEX_FILES = ("tokens", "starts", "lengths")  # FORMAT.md §5.3: the keys of a shard's "files"

# --- §4 arrays ------------------------------------------------------------------------------
NPY_MAGIC = b"\x93NUMPY"  # FORMAT.md §4: the NumPy .npy magic string
NPY_HEADER_BYTES = 128  # FORMAT.md §4: writers emit a 128-byte header (magic to newline)
NPY_ALIGN = 64  # FORMAT.md §4: array data starts at a multiple of 64 bytes
NPY_MAX_HEADER = 4096  # FORMAT.md §8 R6: readers refuse longer .npy headers unparsed
SEGMENTS = ("prompt", "chosen", "rejected")  # FORMAT.md §4.2: row order of starts/lengths
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # FORMAT.md §4.2: row indices
INDEX_DTYPE = np.dtype("<i8")  # FORMAT.md §4.2/§4.3: starts and lengths are int64
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # FORMAT.md §4.1
UINT16_MAX_VOCAB = 1 << 16  # FORMAT.md §4.1: uint16 iff vocab_size <= 65536
MAX_VOCAB = 1 << 32  # FORMAT.md §5.1: ids must fit uint32
COLUMN_DTYPES = {  # FORMAT.md §4.4: whitelisted per-pair column dtypes
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

# --- §6 checksums ---------------------------------------------------------------------------
CHECKSUM_KEY = "xxh3_128"  # FORMAT.md §6: file entries carry this key, 32 lowercase hex digits
_CHECKSUM_RE = re.compile(r"^[0-9a-f]{32}$")
_HASH_CHUNK = 16 * 1024 * 1024


def token_dtype_for_vocab(vocab_size: int) -> str:
    """Token dtype name for a vocabulary of ``vocab_size`` ids (FORMAT.md §4.1)."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def file_checksum(path: str | os.PathLike,
                  visit: Callable[[memoryview, int], None] | None = None) -> str:
    """xxh3-128 of a file's bytes as 32 hex digits (FORMAT.md §6). Streams; runs near disk speed.

    ``visit(chunk, file_offset)``, when given, sees every chunk (16 MiB, at multiples of 16 MiB)
    right after it is hashed, so a caller can check the data in the same pass (verify does).
    """
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        off = 0
        while True:
            if advise is not None:
                # ask for the next chunk now: the disk reads it while this one is hashed
                # (measured cold: ~700-830 MB/s without, ~1000-1180 MB/s with, = `cat` speed)
                advise(fd, off + _HASH_CHUNK, _HASH_CHUNK, os.POSIX_FADV_WILLNEED)
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if visit is not None:
                visit(view[:n], off)
            off += n
    return h.hexdigest()


# --- §4 .npy headers --------------------------------------------------------------------------
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact 128-byte .npy v1.0 header pairpack writes for a C-order array (FORMAT.md §4)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    shape_txt = "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    text = "{'descr': %r, 'fortran_order': False, 'shape': %s, }" % (descr, shape_txt)
    room = NPY_HEADER_BYTES - len(NPY_MAGIC) - 2 - 2  # magic, version, HEADER_LEN
    body = text.encode("latin1")
    if len(body) + 1 > room:  # cannot happen for shapes pairpack writes (< 2**63 per axis)
        raise ValueError(f"npy header too long for shape {shape}")
    body = body + b" " * (room - len(body) - 1) + b"\n"
    return NPY_MAGIC + b"\x01\x00" + (room).to_bytes(2, "little") + body


@dataclass(frozen=True)
class NpyInfo:
    """What a validated .npy header says: dtype, shape and where the data starts (bytes)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_npy_header(path: str | os.PathLike, f: BinaryIO, field_name: str) -> NpyInfo:
    """Parse and check a .npy header without trusting it (FORMAT.md §8 R6).

    Reads at most ``NPY_MAX_HEADER`` + 12 bytes: the declared header length is checked against
    the cap before the header is read, so a header never makes the reader allocate. Refuses
    pickles (object dtypes), structured dtypes, Fortran order, big-endian data and misaligned
    data. The header text is parsed by ``ast.literal_eval`` (via numpy), never executed.
    """
    head = f.read(len(NPY_MAGIC) + 2 + 4 + NPY_MAX_HEADER)
    if len(head) < len(NPY_MAGIC) + 2 or head[:len(NPY_MAGIC)] != NPY_MAGIC:
        raise FormatError("not a .npy file (bad magic string)", path=path, field=field_name,
                          expected=NPY_MAGIC, actual=head[:len(NPY_MAGIC)], section="§8 R6")
    major, minor = head[len(NPY_MAGIC)], head[len(NPY_MAGIC) + 1]
    if (major, minor) not in ((1, 0), (2, 0)):
        raise FormatError("unsupported .npy version", path=path, field=field_name,
                          expected="1.0 or 2.0", actual=f"{major}.{minor}", section="§8 R6")
    len_bytes = 2 if major == 1 else 4
    prefix = len(NPY_MAGIC) + 2 + len_bytes
    hlen = int.from_bytes(head[len(NPY_MAGIC) + 2:prefix], "little")
    if len(head) < prefix or hlen > NPY_MAX_HEADER or len(head) < prefix + hlen:
        raise FormatError("truncated or over-long .npy header", path=path, field=field_name,
                          expected=f"<= {NPY_MAX_HEADER} bytes, present", actual=hlen, section="§8 R6")
    bio = io.BytesIO(head[:prefix + hlen])
    bio.seek(len(NPY_MAGIC) + 2)
    try:
        reader = (np.lib.format.read_array_header_1_0 if major == 1
                  else np.lib.format.read_array_header_2_0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on Python-2 style headers
            shape, fortran, dtype = reader(bio, max_header_size=NPY_MAX_HEADER)
    except Exception as e:  # noqa: BLE001 - hostile header text: any parse failure is a format error
        raise FormatError(f"bad .npy header ({type(e).__name__}: {str(e)[:200]})", path=path,
                          field=field_name, section="§8 R6") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise FormatError("object or structured dtypes are not allowed", path=path, field=field_name,
                          actual=str(dtype), section="§8 R6")
    if fortran:
        raise FormatError("arrays must be C order", path=path, field=field_name,
                          expected=False, actual=True, section="§8 R6")
    if dtype.byteorder == ">":
        raise FormatError("arrays must be little-endian", path=path, field=field_name,
                          actual=dtype.str, section="§8 R6")
    offset = prefix + hlen
    if offset % NPY_ALIGN:
        raise FormatError("array data must start at a multiple of 64 bytes", path=path,
                          field=field_name, actual=offset, section="§8 R6")
    return NpyInfo(dtype=dtype.newbyteorder("<"), shape=tuple(int(s) for s in shape), offset=offset)


def regular_file_size(path: Path, field_name: str) -> int:
    """Size in bytes of ``path``, which must be a regular file (FORMAT.md §8 R4).

    A FIFO or device would block or stream forever; any OS error (missing, a directory, a path
    through a file, permissions, name too long) is a FormatError.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError("file is missing", path=path, field=field_name, section="§8 R4") from None
    except OSError as e:
        raise FormatError(f"cannot stat file ({e.strerror or e})", path=path, field=field_name,
                          section="§8 R4") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FormatError(f"expected a regular file, found {kind}", path=path, field=field_name,
                          section="§8 R4")
    return st.st_size


def open_array(path: Path, field_name: str, *, dtype: np.dtype, shape: tuple[int, ...],
               expected_bytes: int | None) -> np.ndarray:
    """Memory-map one array file after checking header, dtype, shape and exact file size.

    The file must hold exactly header + data bytes (no trailing bytes: FORMAT.md §8 R8). Empty
    arrays are returned as ordinary empty arrays (mmap cannot map zero bytes).
    """
    size = regular_file_size(path, field_name)
    if expected_bytes is not None and size != expected_bytes:
        raise ChecksumError("file size differs from the manifest", path=path, field=f"{field_name}.bytes",
                            expected=expected_bytes, actual=size, section="§8 R5")
    try:
        with open(path, "rb") as f:
            info = read_npy_header(path, f, field_name)
    except OSError as e:
        raise FormatError(f"cannot read file ({e.strerror or e})", path=path, field=field_name,
                          section="§8 R4") from None
    if info.dtype != dtype:
        raise FormatError("wrong dtype", path=path, field=field_name, expected=dtype.name,
                          actual=info.dtype.name, section="§8 R7")
    if info.shape != tuple(shape):
        raise FormatError("wrong shape", path=path, field=field_name, expected=list(shape),
                          actual=list(info.shape), section="§8 R7")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))  # Python ints: no overflow
    if info.offset + nbytes != size:
        raise FormatError("file size does not match header + data", path=path, field=field_name,
                          expected=info.offset + nbytes, actual=size, section="§8 R8")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    # a plain ndarray view of the map: zero-copy, and slices print as arrays, not memmaps
    return np.memmap(path, dtype=dtype, mode="r", offset=info.offset, shape=tuple(shape)).view(np.ndarray)


# --- §5 manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """A file of the dataset: relative path, byte size, xxh3-128 checksum (FORMAT.md §5.3)."""

    path: str
    bytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, CHECKSUM_KEY: self.checksum}


@dataclass(frozen=True)
class ShardInfo:
    """One shard's entry in the manifest (FORMAT.md §5.3)."""

    name: str
    num_pairs: int
    num_tokens: int
    num_prompts: int
    files: dict[str, FileEntry]
    columns: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_pairs": self.num_pairs,
            "num_tokens": self.num_tokens,
            "num_prompts": self.num_prompts,
            "files": {k: self.files[k].to_json() for k in INDEX_FILES},
            "columns": {k: v.to_json() for k, v in sorted(self.columns.items())},
        }


@dataclass(frozen=True)
class ColumnInfo:
    """A per-pair column declared in the manifest (FORMAT.md §4.4, §5.4)."""

    name: str
    dtype: str
    description: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "description": self.description,
                "attrs": self.attrs}


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated ``manifest.json`` (FORMAT.md §5)."""

    num_pairs: int
    token_dtype: str
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    tokenizer: dict[str, Any] | None
    shards: tuple[ShardInfo, ...]
    columns: tuple[ColumnInfo, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "num_pairs": self.num_pairs,
            "token_dtype": self.token_dtype,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "tokenizer": self.tokenizer,
            "checksum": CHECKSUM_KEY,
            "columns": [c.to_json() for c in self.columns],
            "shards": [s.to_json() for s in self.shards],
            "provenance": self.provenance,
        }

    def dumps(self) -> bytes:
        """Canonical bytes of the manifest: sorted keys, 1-space indent, trailing newline (§5)."""
        return (json.dumps(self.to_json(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()

    def files(self) -> list[FileEntry]:
        """Every file the manifest names (§5.3, §5.2): index files and columns of each shard in
        order, then the tokenizer copy when there is one."""
        out = [e for s in self.shards
               for e in [s.files[k] for k in INDEX_FILES] + [s.columns[k] for k in sorted(s.columns)]]
        f = (self.tokenizer or {}).get("file")
        if f is not None:
            out.append(FileEntry(f["path"], f["bytes"], f[CHECKSUM_KEY]))
        return out

    def fingerprint(self) -> str:
        """xxh3-128 over the checksums of token/index files: identity of the pairs (FORMAT.md §7.3).

        Adding or changing per-pair columns does not change it.
        """
        h = xxhash.xxh3_128()
        h.update(f"{self.num_pairs}\n".encode())
        for s in self.shards:
            for k in INDEX_FILES:
                h.update(f"{s.name}/{k}:{s.files[k].checksum}\n".encode())
        return h.hexdigest()


def _req(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], path: Any, where: str,
         rule: str = "§8 R9") -> Any:
    if key not in obj:
        raise FormatError("missing required key", path=path, field=f"{where}{key}", section=rule)
    v = obj[key]
    # bool is an int subclass: never accept it where a number is required
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError("wrong type", path=path, field=f"{where}{key}", actual=v, section=rule)
    if not isinstance(v, types):
        raise FormatError("wrong type", path=path, field=f"{where}{key}",
                          expected=getattr(types, "__name__", str(types)), actual=type(v).__name__,
                          section=rule)
    return v


def _nonneg(v: int, path: Any, fld: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if not lo <= v <= hi:
        raise FormatError(f"out of range [{lo}, {hi}]", path=path, field=fld, actual=v, section="§8 R9")
    return v


def check_relpath(rel: str, path: Any, fld: str) -> str:
    """A manifest file path must stay inside the dataset: no absolute path, no '..' (§8 R3)."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise FormatError("file paths must be relative, '/'-separated, without '.' or '..'",
                          path=path, field=fld, actual=rel, section="§8 R3")
    return rel


def _file_entry(obj: Any, path: Any, fld: str) -> FileEntry:
    if not isinstance(obj, dict):
        raise FormatError("file entry must be an object", path=path, field=fld, section="§8 R9")
    rel = check_relpath(_req(obj, "path", str, path, fld + "."), path, fld + ".path")
    size = _nonneg(_req(obj, "bytes", int, path, fld + "."), path, fld + ".bytes")
    digest = _req(obj, CHECKSUM_KEY, str, path, fld + ".")
    if not _CHECKSUM_RE.fullmatch(digest):  # fullmatch: "$" would accept a trailing newline
        raise FormatError("checksum must be 32 lowercase hex digits", path=path,
                          field=f"{fld}.{CHECKSUM_KEY}", actual=digest, section="§8 R9")
    return FileEntry(rel, size, digest)


def parse_manifest(data: bytes, path: Any = MANIFEST_NAME) -> Manifest:
    """Parse and structurally validate manifest bytes (FORMAT.md §5, §8 R1-R3, R9-R11).

    Checks types, ranges and cross-field consistency; never touches array files.
    """
    if len(data) > MANIFEST_MAX_BYTES:
        raise FormatError("manifest is larger than the cap", path=path, field="manifest",
                          expected=f"<= {MANIFEST_MAX_BYTES} bytes", actual=len(data), section="§8 R1")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
        # ValueError also covers integers longer than Python's int-parsing digit limit
        raise FormatError(f"manifest is not valid UTF-8 JSON ({str(e)[:200]})", path=path, field="manifest",
                          section="§8 R1") from None
    if not isinstance(obj, dict):
        raise FormatError("manifest must be a JSON object", path=path, field="manifest", section="§8 R1")
    if obj.get("format") != FORMAT_NAME:
        raise FormatError("not a pairpack manifest", path=path, field="format",
                          expected=FORMAT_NAME, actual=obj.get("format"), section="§8 R2")
    version = _req(obj, "format_version", int, path, "", "§8 R2")
    if version != FORMAT_VERSION:
        raise FormatError("unsupported format version; upgrade pairpack to read it", path=path,
                          field="format_version", expected=FORMAT_VERSION, actual=version, section="§8 R2")
    if obj.get("checksum") != CHECKSUM_KEY:
        raise FormatError("unknown checksum algorithm", path=path, field="checksum",
                          expected=CHECKSUM_KEY, actual=obj.get("checksum"), section="§8 R2")
    num_pairs = _nonneg(_req(obj, "num_pairs", int, path, ""), path, "num_pairs")
    token_dtype = _req(obj, "token_dtype", str, path, "")
    if token_dtype not in TOKEN_DTYPES:
        raise FormatError("token_dtype must be uint16 or uint32", path=path, field="token_dtype",
                          actual=token_dtype, section="§8 R9")
    vocab_size = _nonneg(_req(obj, "vocab_size", int, path, ""), path, "vocab_size", lo=1, hi=MAX_VOCAB)
    if token_dtype_for_vocab(vocab_size) != token_dtype:
        raise FormatError("token_dtype does not match vocab_size", path=path, field="token_dtype",
                          expected=token_dtype_for_vocab(vocab_size), actual=token_dtype, section="§8 R9")
    pad_id = _nonneg(_req(obj, "pad_id", int, path, ""), path, "pad_id", hi=vocab_size - 1)
    special: dict[str, int | None] = {}
    for key in ("bos_id", "eos_id"):
        v = obj.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise FormatError("must be an integer or null", path=path, field=key, actual=v, section="§8 R9")
            _nonneg(v, path, key, hi=vocab_size - 1)
        special[key] = v
    tok = obj.get("tokenizer")
    if tok is not None and not isinstance(tok, dict):
        raise FormatError("must be an object or null", path=path, field="tokenizer", section="§8 R9")
    if tok is not None and tok.get("file") is not None:
        _file_entry(tok["file"], path, "tokenizer.file")  # §5.2: a file entry, inside the dataset
    prov = obj.get("provenance", {})
    if not isinstance(prov, dict):
        raise FormatError("must be an object", path=path, field="provenance", section="§8 R9")

    raw_cols = _req(obj, "columns", list, path, "", "§8 R10")
    columns = []
    for i, c in enumerate(raw_cols):
        fld = f"columns[{i}]"
        if not isinstance(c, dict):
            raise FormatError("column must be an object", path=path, field=fld, section="§8 R10")
        name = _req(c, "name", str, path, fld + ".", "§8 R10")
        if not COLUMN_NAME_RE.fullmatch(name):
            raise FormatError("bad column name", path=path, field=fld + ".name", actual=name, section="§8 R10")
        dt = _req(c, "dtype", str, path, fld + ".", "§8 R10")
        if dt not in COLUMN_DTYPES:
            raise FormatError("column dtype not allowed", path=path, field=fld + ".dtype",
                              expected=sorted(COLUMN_DTYPES), actual=dt, section="§8 R10")
        attrs = c.get("attrs", {})
        if not isinstance(attrs, dict):
            raise FormatError("must be an object", path=path, field=fld + ".attrs", section="§8 R10")
        columns.append(ColumnInfo(name, dt, str(c.get("description", "")), attrs))
    col_names = [c.name for c in columns]
    if len(set(col_names)) != len(col_names):
        raise FormatError("duplicate column names", path=path, field="columns", actual=col_names, section="§8 R10")

    raw_shards = _req(obj, "shards", list, path, "")
    shards = []
    seen_paths: set[str] = set()
    total = 0
    for i, s in enumerate(raw_shards):
        fld = f"shards[{i}]"
        if not isinstance(s, dict):
            raise FormatError("shard must be an object", path=path, field=fld, section="§8 R11")
        name = _req(s, "name", str, path, fld + ".", "§8 R11")
        if not SHARD_NAME_RE.fullmatch(name):
            raise FormatError("bad shard name", path=path, field=fld + ".name", actual=name, section="§8 R11")
        n = _nonneg(_req(s, "num_pairs", int, path, fld + "."), path, fld + ".num_pairs")
        t = _nonneg(_req(s, "num_tokens", int, path, fld + "."), path, fld + ".num_tokens")
        u = _nonneg(_req(s, "num_prompts", int, path, fld + "."), path, fld + ".num_prompts", hi=n)
        files_obj = _req(s, "files", dict, path, fld + ".", "§8 R11")
        if set(files_obj) != set(INDEX_FILES):
            raise FormatError("shard files must be exactly tokens, starts, lengths", path=path,
                              field=fld + ".files", expected=list(INDEX_FILES), actual=sorted(files_obj),
                              section="§8 R11")
        files = {k: _file_entry(files_obj[k], path, f"{fld}.files.{k}") for k in INDEX_FILES}
        cols_obj = s.get("columns", {})
        if not isinstance(cols_obj, dict) or set(cols_obj) != set(col_names):
            raise FormatError("shard columns must match the declared columns", path=path,
                              field=fld + ".columns", expected=sorted(col_names),
                              actual=sorted(cols_obj) if isinstance(cols_obj, dict) else cols_obj,
                              section="§8 R10")
        cols = {k: _file_entry(v, path, f"{fld}.columns.{k}") for k, v in cols_obj.items()}
        for e in list(files.values()) + list(cols.values()):
            if e.path in seen_paths:
                raise FormatError("two entries name the same file", path=path, field=fld,
                                  actual=e.path, section="§8 R3")
            seen_paths.add(e.path)
        shards.append(ShardInfo(name, n, t, u, files, cols))
        total += n
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise FormatError("duplicate shard names", path=path, field="shards", section="§8 R11")
    if total != num_pairs:
        raise FormatError("num_pairs differs from the sum over shards", path=path, field="num_pairs",
                          expected=total, actual=num_pairs, section="§8 R9")
    return Manifest(
        num_pairs=num_pairs, token_dtype=token_dtype, vocab_size=vocab_size, pad_id=pad_id,
        bos_id=special["bos_id"], eos_id=special["eos_id"], tokenizer=tok, shards=tuple(shards),
        columns=tuple(columns), provenance=prov, format_version=version,
    )


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read ``root/manifest.json`` with the size cap applied before parsing (FORMAT.md §8 R1)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise FormatError("not a dataset directory", path=root, field="manifest", section="§3")
    if not (path.exists() or path.is_symlink()):
        raise FormatError("manifest.json is missing: not a pairpack dataset", path=root,
                          field="manifest", section="§3")
    resolve_file(root, MANIFEST_NAME)  # a symlinked manifest must stay inside too (R3)
    size = regular_file_size(path, "manifest")
    if size > MANIFEST_MAX_BYTES:  # refused unread, before any parsing (R1)
        raise FormatError("manifest is larger than the cap", path=path, field="manifest",
                          expected=f"<= {MANIFEST_MAX_BYTES} bytes", actual=size, section="§8 R1")
    try:
        with open(path, "rb") as f:
            # read(n) allocates n bytes up front: ask for the stat size, not the cap
            data = f.read(min(size, MANIFEST_MAX_BYTES) + 1)
    except OSError as e:
        raise FormatError(f"cannot read manifest ({e.strerror or e})", path=path, field="manifest",
                          section="§8 R4") from None
    return parse_manifest(data, path)


def resolve_file(root: Path, rel: str) -> Path:
    """Absolute path of a manifest-relative file, refusing symlinks that lead out (§8 R3)."""
    p = root / rel
    try:
        real = p.resolve(strict=False)
        base = root.resolve()
    except (OSError, RuntimeError) as e:
        raise FormatError(f"cannot resolve path ({e})", path=p, field="path", section="§8 R3") from None
    if base != real and base not in real.parents:
        raise FormatError("file resolves outside the dataset directory", path=p, field="path",
                          actual=str(real), section="§8 R3")
    return p
