"""Tokenizers pairpack can build with. Nothing here downloads anything.

The default is :class:`ByteTokenizer`: UTF-8 bytes as ids 0-255 plus three special ids, so every
text input works with no tokenizer files at all.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import xxhash

from .errors import TokenizerError

__all__ = ["Tokenizer", "ByteTokenizer", "tokenizer_from_manifest"]


class Tokenizer(Protocol):
    """What the build needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` (1-D integer array), with no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` over many texts."""

    def decode(self, ids: Any) -> str:
        """Text of ``ids``."""

    def identity(self) -> dict[str, Any]:
        """The manifest "tokenizer" object (FORMAT.md §5.2)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 = pad, 257 = bos, 258 = eos; vocabulary of 259 ids.

    Example:
        >>> t = ByteTokenizer()
        >>> t.encode("hé").tolist()
        [104, 195, 169]
        >>> t.decode([104, 195, 169, 258])
        'hé<eos>'
    """

    name = "pairpack-bytes-v1"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    _specials = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

    def encode(self, text: str) -> np.ndarray:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
            raise TokenizerError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        out: list[str] = []
        start = 0
        special = np.nonzero(arr >= 256)[0].tolist()
        for j in special + [len(arr)]:
            if j > start:
                out.append(arr[start:j].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            if j < len(arr):
                out.append(self._specials.get(int(arr[j]), f"<{int(arr[j])}>"))
            start = j + 1
        return "".join(out)

    def identity(self) -> dict[str, Any]:
        desc = f"{self.name}:{self.vocab_size}:{self.pad_id}:{self.bos_id}:{self.eos_id}"
        return {"kind": "bytes", "name": self.name, "vocab_size": self.vocab_size,
                "hash": xxhash.xxh3_128_hexdigest(desc.encode())}


def tokenizer_from_manifest(obj: dict[str, Any]) -> Any:
    """A decoder for the manifest's tokenizer object, or None when it cannot be rebuilt here."""
    if obj.get("kind") == "bytes" and obj.get("name") == ByteTokenizer.name:
        return ByteTokenizer()
    return None
