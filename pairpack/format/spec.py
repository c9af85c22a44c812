"""Constants of the pairpack format. spec/FORMAT.md is normative; each constant names its section."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import ArgumentError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "MANIFEST_MAX_BYTES", "SHARD_NAME_RE", "COLUMN_NAME_RE", "TOKENS_FILE", "STARTS_FILE", "LENGTHS_FILE", "INDEX_FILES", "NPY_MAGIC", "NPY_HEADER_BYTES", "NPY_ALIGN", "NPY_MAX_HEADER", "SEGMENTS", "PROMPT", "CHOSEN", "REJECTED", "INDEX_DTYPE", "TOKEN_DTYPES", "UINT16_MAX_VOCAB", "MAX_VOCAB", "COLUMN_DTYPES", "CHECKSUM_KEY", "SPLITS_DIR", "SPLIT_NAME_RE", "SPLIT_BY", "SPLIT_DTYPE", "token_dtype_for_vocab", "round_up"]


# --- §2 identity and versioning -------------------------------------------------------------
FORMAT_NAME = "pairpack"  # FORMAT.md §2: value of manifest "format"
FORMAT_VERSION = 1  # FORMAT.md §2: value of manifest "format_version"; independent of the package
"""The format version this package reads and writes: the manifest's ``"format_version"`` (FORMAT.md §2),
versioned independently of the package."""
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
PROMPT = 0  # FORMAT.md §4.2: row index
"""Row of the prompt segment in ``starts.npy``/``lengths.npy`` (FORMAT.md §4.2); also the
``token_part`` of prompt tokens in a packed batch."""
CHOSEN = 1  # FORMAT.md §4.2: row index
"""Row of the chosen completion (FORMAT.md §4.2); the ``token_part`` of chosen tokens."""
REJECTED = 2  # FORMAT.md §4.2: row index
"""Row of the rejected completion (FORMAT.md §4.2); the ``token_part`` of rejected tokens."""
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

# --- §4.5 / §5.6 splits --------------------------------------------------------------------
SPLITS_DIR = "splits"  # FORMAT.md §3, §4.5: the directory of split files
SPLIT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # FORMAT.md §5.6: split names
SPLIT_BY = ("prompt", "pair")  # FORMAT.md §5.6: values of a split's "by"
SPLIT_DTYPE = np.dtype("<i8")  # FORMAT.md §4.5: split files hold int64 pair indices

# --- §6 checksums ---------------------------------------------------------------------------
CHECKSUM_KEY = "xxh3_128"  # FORMAT.md §6: file entries carry this key, 32 lowercase hex digits
_CHECKSUM_RE = re.compile(r"^[0-9a-f]{32}$")
_HASH_CHUNK = 16 * 1024 * 1024



def token_dtype_for_vocab(vocab_size: int) -> str:
    """Token dtype name for a vocabulary of ``vocab_size`` ids (FORMAT.md §4.1)."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ArgumentError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def round_up(n: Any, multiple: int | None) -> Any:
    """``n`` (int or int array) rounded up to a multiple of ``multiple`` (None or 0: unchanged).

    The one rounding rule of padded lengths and aligned offsets (readers, batches, staging buffers).
    """
    return -(-n // multiple) * multiple if multiple else n
