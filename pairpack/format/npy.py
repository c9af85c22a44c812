""".npy headers as FORMAT.md §4 restricts them: writing the fixed 128-byte header, parsing a header
without trusting it (§8 R6), and memory-mapping an array after its size is checked (R7-R8)."""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import ArgumentError, ChecksumError, FormatError
from .spec import NPY_ALIGN, NPY_HEADER_BYTES, NPY_MAGIC, NPY_MAX_HEADER

__all__ = ["npy_header", "regular_file_size", "open_array"]


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact 128-byte .npy v1.0 header pairpack writes for a C-order array (FORMAT.md §4)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    shape_txt = "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    text = "{'descr': %r, 'fortran_order': False, 'shape': %s, }" % (descr, shape_txt)
    room = NPY_HEADER_BYTES - len(NPY_MAGIC) - 2 - 2  # magic, version, HEADER_LEN
    body = text.encode("latin1")
    if len(body) + 1 > room:  # cannot happen for shapes pairpack writes (< 2**63 per axis)
        raise ArgumentError(f"npy header too long for shape {shape}")
    body = body + b" " * (room - len(body) - 1) + b"\n"
    return NPY_MAGIC + b"\x01\x00" + (room).to_bytes(2, "little") + body


@dataclass(frozen=True)
class _NpyInfo:
    """What a validated .npy header says: dtype, shape and where the data starts (bytes)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def _read_npy_header(path: str | os.PathLike, f: BinaryIO, field_name: str) -> _NpyInfo:
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
    return _NpyInfo(dtype=dtype.newbyteorder("<"), shape=tuple(int(s) for s in shape), offset=offset)


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
            info = _read_npy_header(path, f, field_name)
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
