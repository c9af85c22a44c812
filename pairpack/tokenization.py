"""Tokenizers pairpack can build with. Nothing here downloads anything.

The default is :class:`ByteTokenizer`: UTF-8 bytes as ids 0-255 plus three special ids, so every
text input works with no tokenizer files at all. :class:`HFTokenizer` wraps any Hugging Face
``tokenizer.json`` through the optional ``tokenizers`` package (``pip install "pairpack[hf]"``).

Both encode with no special tokens added: the build adds BOS/EOS itself, once, so prompt and
completions can be tokenized separately and concatenated as ids (FORMAT.md §7).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import xxhash

from . import format as fmt
from .errors import FormatError, MissingDependencyError, TokenizerError, import_optional

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_from_manifest",
           "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"  # the copy a dataset keeps of its Hugging Face tokenizer (§5.2)

# Looked up (in this order) among the tokenizer's tokens when no tokenizer_config.json says better.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
    """What the build needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` (1-D integer array), with no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[Any]:
        """``encode`` over many texts (each a sequence of ids)."""

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

    def token_text(self, token_id: int | None) -> str:
        """The text form of a special id (for chat templates' ``bos_token``/``eos_token``)."""
        return "" if token_id is None else self._specials.get(int(token_id), "")

    def identity(self) -> dict[str, Any]:
        desc = f"{self.name}:{self.vocab_size}:{self.pad_id}:{self.bos_id}:{self.eos_id}"
        return {"kind": "bytes", "name": self.name, "vocab_size": self.vocab_size,
                "hash": xxhash.xxh3_128_hexdigest(desc.encode())}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.name)


def _import_tokenizers() -> Any:
    return import_optional("tokenizers", feature="a Hugging Face tokenizer.json", extra="hf")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package.

    Args:
        path: the ``tokenizer.json`` file.
        bos_token, eos_token, pad_token: the special tokens, as token text or id. Unset ones come
            from a ``tokenizer_config.json`` beside the file when there is one, else from the
            usual names (``<|endoftext|>``, ``</s>``, ``<s>``, ``<pad>``, ...). ``pad_id`` falls
            back to ``eos_id`` (masks come from lengths, so the pad value is never interpreted).
        name: the name recorded in the manifest (default: the file name).
        expected_hash: refuse the file unless its xxh3-128 equals this (used when a dataset's
            tokenizer is re-opened for decoding).

    Attributes:
        vocab_size: ids are in ``[0, vocab_size)``: the largest id of the vocabulary including
            added tokens, plus one (151,669 for Qwen3 -> uint32 tokens; 50,257 for GPT-2 -> uint16).
        hash: xxh3-128 of the file's bytes, 32 hex digits.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | int | None = None,
                 eos_token: str | int | None = None, pad_token: str | int | None = None,
                 name: str | None = None, expected_hash: str | None = None) -> None:
        tk = _import_tokenizers()
        self.path = Path(path).resolve()
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from None
        self.hash = xxhash.xxh3_128_hexdigest(data)
        if expected_hash is not None and expected_hash != self.hash:
            raise TokenizerError(f"{path}: tokenizer file differs from the one recorded "
                                 f"(xxh3_128 {self.hash}, expected {expected_hash})")
        try:
            self._tok = tk.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{path}: not a valid Hugging Face tokenizer.json ({str(e)[:200]})") from None
        self.nbytes = len(data)
        self.name = name or self.path.name
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = (max(vocab.values()) + 1) if vocab else 1
        cfg = self._sibling_config()
        self.bos_id = self._special(bos_token, cfg.get("bos_token"), _BOS_CANDIDATES, "bos_token")
        self.eos_id = self._special(eos_token, cfg.get("eos_token"), _EOS_CANDIDATES, "eos_token")
        pad = self._special(pad_token, cfg.get("pad_token"), _PAD_CANDIDATES, "pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._opts = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "name": name}

    # pickled by path (worker processes re-load it; the hash pins the exact file)
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_hf, (str(self.path), self._opts, self.hash))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and other.identity() == self.identity()

    def __hash__(self) -> int:
        return hash(self.hash)

    def _sibling_config(self) -> dict[str, Any]:
        p = self.path.with_name("tokenizer_config.json")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        out = {}
        for k in ("bos_token", "eos_token", "pad_token"):
            v = obj.get(k) if isinstance(obj, dict) else None
            if isinstance(v, dict):  # {"content": "<s>", ...} form
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        return out

    def _special(self, given: str | int | None, configured: str | None, candidates: Sequence[str],
                 what: str) -> int | None:
        if given is not None:
            if isinstance(given, int) and not isinstance(given, bool):
                if not 0 <= given < self.vocab_size:
                    raise TokenizerError(f"{self.path}: {what} id {given} is not in [0, {self.vocab_size})")
                return given
            tid = self._tok.token_to_id(str(given))
            if tid is None:
                raise TokenizerError(f"{self.path}: {what} {given!r} is not a token of this tokenizer")
            return int(tid)
        if configured is not None:
            tid = self._tok.token_to_id(configured)
            if tid is not None:
                return int(tid)
        # only added (special) tokens qualify: "<s>" is an ordinary BPE token in some vocabularies
        added = {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items()}
        for c in candidates:
            if c in added:
                return added[c]
        return None

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as int64, no special tokens added (added tokens in the text are matched)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts (lists of ints). Multi-threaded in Rust unless
        ``TOKENIZERS_PARALLELISM=false`` (pairpack's build workers set that: one thread each)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        """Text of ``ids``, special tokens included."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def token_text(self, token_id: int | None) -> str:
        """The token text of ``token_id`` ("" for None): ``bos_token``/``eos_token`` in templates."""
        if token_id is None:
            return ""
        return self._tok.id_to_token(int(token_id)) or ""

    def identity(self) -> dict[str, Any]:
        """Manifest "tokenizer" object (FORMAT.md §5.2): kind, name, hash, vocab_size, special ids,
        and the absolute path the file was read from (a hint for decoding; the dataset's own copy,
        recorded by the build under "file", is preferred)."""
        return {"kind": "huggingface", "name": self.name, "hash": self.hash, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "source_path": str(self.path)}


def _rebuild_hf(path: str, opts: dict[str, Any], digest: str) -> HFTokenizer:
    return HFTokenizer(path, expected_hash=digest, **opts)


def load_tokenizer(spec: Any, **special: Any) -> Any:
    """A tokenizer from a CLI/API value: None or ``"bytes"`` -> :class:`ByteTokenizer`; a path to a
    ``tokenizer.json`` (or a directory holding one) -> :class:`HFTokenizer`; objects pass through."""
    if spec is None or (isinstance(spec, str) and spec in ("bytes", ByteTokenizer.name)):
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise TokenizerError(f"{spec}: tokenizer file not found (expected a Hugging Face tokenizer.json)")
        return HFTokenizer(p, **special)
    return spec


def tokenizer_from_manifest(obj: dict[str, Any], root: str | os.PathLike | None = None) -> Any:
    """A decoder for the manifest's tokenizer object, or None when it cannot be rebuilt here.

    A Hugging Face tokenizer is loaded from the dataset's own copy (``obj["file"]``, relative to
    ``root`` and inside it), and only when the file's hash equals ``obj["hash"]``; without the
    ``tokenizers`` package it is None (ids are shown instead). ``obj["source_path"]`` is never
    read: an untrusted manifest must not make pairpack open files outside the dataset.
    """
    kind = obj.get("kind")
    if kind == "bytes" and obj.get("name") == ByteTokenizer.name:
        return ByteTokenizer()
    if kind == "huggingface":
        candidates = []
        f = obj.get("file")
        if root is not None and isinstance(f, dict) and isinstance(f.get("path"), str):
            try:  # the dataset's copy must stay inside it (FORMAT.md §8 R3)
                candidates.append(fmt.resolve_file(Path(root), fmt.check_relpath(f["path"], root, "tokenizer.file")))
            except FormatError:
                pass
        for p in candidates:
            if not p.is_file():
                continue
            try:
                return HFTokenizer(p, bos_token=obj.get("bos_id"), eos_token=obj.get("eos_id"),
                                   pad_token=obj.get("pad_id"), name=obj.get("name"),
                                   expected_hash=obj.get("hash"))
            except (TokenizerError, MissingDependencyError):
                continue
    return None
