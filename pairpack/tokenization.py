"""Tokenizers pairpack can build with. Nothing here downloads anything.

The default is :class:`ByteTokenizer`: UTF-8 bytes as ids 0-255 plus three special ids, so every
text input works with no tokenizer files at all. :class:`HFTokenizer` wraps any Hugging Face
``tokenizer.json`` through the optional ``tokenizers`` package (``pip install "pairpack[hf]"``).

Both encode with no special tokens added: the build adds BOS/EOS itself, once, so prompt and
completions can be tokenized separately and concatenated as ids (FORMAT.md §7.4). The build
tokenizes text pairs' rows whole and cuts them where the prompt ends
(:mod:`pairpack.ingest.joins`); continuations (below) encode the completions of rows whose whole
tokenization merges tokens across that point, and of multi-completion records.

Joins. SentencePiece-style tokenizers (Llama-2, Mistral, Phi-3) mark the start of every text they
encode with "▁": encoded alone, the completion " No" becomes ``[▁, ▁No]`` where the whole row
"Assistant: No" has only ``▁No``. :meth:`HFTokenizer.encode_batch` with ``continuation=True``
encodes such text after a fixed *anchor* ("\n") and drops the anchor's ids, so prompt ids +
completion ids equal the whole row's ids wherever the tokenizer itself puts a token boundary at
the join. The anchor is chosen once per tokenizer by probing it (:func:`_probe_join`), and
checked again on every text (a text whose anchored encoding does not start with the anchor's ids
is encoded alone).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import xxhash

from . import format as fmt
from .errors import FormatError, MissingDependencyError, TokenizerError, import_optional

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_from_manifest",
           "encode_continuations", "decode_rows", "check_join", "describe_special", "TOKENIZER_FILE",
           "TOKENIZER_CONFIG_FILE"]

TOKENIZER_FILE = "tokenizer.json"
"""The file name of a Hugging Face tokenizer, and of the copy a dataset keeps of it (FORMAT.md §5.2)."""
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""A model directory's file with the chat template, BOS/EOS and ``add_bos_token``."""
# Anchors tried, in order, for continuations of tokenizers that mark the start of a text (see the
# module docstring); a newline is a byte-fallback or single token in every vocabulary probed.
_JOIN_ANCHORS = ("\n", "\n\n", "a")
# Probe texts: continuations a prompt is commonly followed by (a word after a space, a word glued
# to the prompt, a digit, a CJK character, a newline)
_JOIN_PROBES = (" No", "No", "Hello world", " 1", "你好", "\nYes")

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
        """int64 ``(n,)``: the UTF-8 bytes of ``text``; TokenizerError for lone surrogates."""
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
            raise TokenizerError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str], continuation: bool = False) -> list[np.ndarray]:
        """``encode`` of each text; bytes join exactly, so ``continuation`` changes nothing."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        """Text of ``ids``: byte runs decoded as UTF-8 (invalid bytes replaced), specials as
        ``<pad>``, ``<bos>``, ``<eos>``."""
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
        """The manifest "tokenizer" object (FORMAT.md §5.2): kind ``bytes``, name, vocabulary, hash."""
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
        bos_token: the BOS token, as token text or id. Unset special tokens come from a
            ``tokenizer_config.json`` beside the file when there is one, else from the usual names
            (``<|endoftext|>``, ``</s>``, ``<s>``, ``<pad>``, ...).
        eos_token: the EOS token, likewise.
        pad_token: the pad token, likewise; ``pad_id`` falls back to ``eos_id`` (masks come from
            lengths, so the pad value is never interpreted).
        name: the name recorded in the manifest (default: the file name, or the directory's name
            for a model directory's ``tokenizer.json``).
        expected_hash: refuse the file unless its xxh3-128 equals this (used when a dataset's
            tokenizer is re-opened for decoding).
        use_config: read ``tokenizer_config.json`` beside the file (False when a dataset's copy is
            re-opened: its specials come from the manifest).

    Attributes:
        vocab_size: ids are in ``[0, vocab_size)``: the largest id of the vocabulary including
            added tokens, plus one (151,669 for Qwen3 -> uint32 tokens; 50,257 for GPT-2 -> uint16).
        hash: xxh3-128 of the file's bytes, 32 hex digits.
        chat_template: the Jinja chat template of ``tokenizer_config.json`` (None without one).
        add_bos: the config's ``add_bos_token`` (None when it does not say).
        config_hash: xxh3-128 of ``tokenizer_config.json`` (None without one).
        join_anchor: the anchor continuations are encoded after (None: they are encoded alone;
            see the module docstring).
        fresh_after_added: whether text right after an added (special) token is encoded as a new
            text, start marker included (as Phi-3's tokenizer does), so that a continuation of a
            prompt ending with such a token is encoded alone.
        special_sources: where each of bos/eos/pad came from: "given", "config", "guessed" or None.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | int | None = None,
                 eos_token: str | int | None = None, pad_token: str | int | None = None,
                 name: str | None = None, expected_hash: str | None = None, use_config: bool = True) -> None:
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
        in_model_dir = self.path.name == TOKENIZER_FILE and self.path.with_name(TOKENIZER_CONFIG_FILE).is_file()
        self.name = name or (self.path.parent.name if in_model_dir and use_config else self.path.name)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = (max(vocab.values()) + 1) if vocab else 1
        cfg = self._sibling_config() if use_config else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.add_bos: bool | None = cfg.get("add_bos_token")
        self.config_hash: str | None = cfg.get("hash")
        self.special_sources: dict[str, str | None] = {}
        self.bos_id = self._special(bos_token, cfg.get("bos_token"), _BOS_CANDIDATES, "bos_token")
        self.eos_id = self._special(eos_token, cfg.get("eos_token"), _EOS_CANDIDATES, "eos_token")
        pad = self._special(pad_token, cfg.get("pad_token"), _PAD_CANDIDATES, "pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._opts = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "name": name,
                      "use_config": use_config}
        self.join_anchor, self._anchor_ids = _probe_join(self._encode_plain)
        self._added_ids = frozenset(int(i) for i in self._tok.get_added_tokens_decoder())
        self.fresh_after_added = self._probe_after_added()
        self._hard_split: tuple[str, ...] | None = None

    # pickled by path (worker processes re-load it; the hash pins the exact file)
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_hf, (str(self.path), self._opts, self.hash))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and other.identity() == self.identity()

    def __hash__(self) -> int:
        return hash(self.hash)

    def _sibling_config(self) -> dict[str, Any]:
        """What ``tokenizer_config.json`` beside the file says: specials, chat template, add_bos."""
        p = self.path.with_name(TOKENIZER_CONFIG_FILE)
        try:
            raw = p.read_bytes()
        except OSError:
            return {}
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise TokenizerError(f"{p}: not valid JSON ({str(e)[:160]}); fix or remove it") from None
        if not isinstance(obj, dict):
            return {}
        out: dict[str, Any] = {"hash": xxhash.xxh3_128_hexdigest(raw)}
        for k in ("bos_token", "eos_token", "pad_token"):
            v = obj.get(k)
            if isinstance(v, dict):  # {"content": "<s>", ...} form
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        tmpl = obj.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"),
                        None)
        if isinstance(tmpl, str) and tmpl.strip():
            out["chat_template"] = tmpl
        if isinstance(obj.get("add_bos_token"), bool):
            out["add_bos_token"] = obj["add_bos_token"]
        return out

    def _special(self, given: str | int | None, configured: str | None, candidates: Sequence[str],
                 what: str) -> int | None:
        key = what.split("_")[0]
        if given is not None:
            self.special_sources[key] = "given"
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
                self.special_sources[key] = "config"
                return int(tid)
        # only added (special) tokens qualify: "<s>" is an ordinary BPE token in some vocabularies
        added = {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items()}
        for c in candidates:
            if c in added:
                self.special_sources[key] = "guessed"
                return added[c]
        self.special_sources[key] = None
        return None

    def _probe_after_added(self) -> bool:
        """Whether the whole-row encoding of ``<added token> + text`` encodes ``text`` alone
        (with its start marker), rather than as a continuation."""
        if self.join_anchor is None or not self._added_ids:
            return False
        tid = self.eos_id if self.eos_id in self._added_ids else min(self._added_ids)
        t = self._tok.id_to_token(tid)
        head, whole = self._encode_plain([t, t + "No"])
        alone = self._encode_plain(["No"])[0]
        return whole[:len(head)] == head and whole[len(head):] == alone

    def _encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, continuation: bool = False, after: int | None = None) -> np.ndarray:
        """Ids of ``text`` as int64, no special tokens added (added tokens in the text are matched).
        ``continuation``: ``text`` follows other text in the same row (a completion after its
        prompt, whose last id is ``after``), so no start-of-text marker is added unless the
        tokenizer would add one there (see the module docstring)."""
        if continuation and self.join_anchor is not None:
            return np.asarray(self.encode_batch([text], continuation=True, after=[after])[0], dtype=np.int64)
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str], continuation: bool = False,
                     after: Sequence[int | None] | None = None) -> list[list[int]]:
        """Ids of many texts (lists of ints); ``continuation`` as in :meth:`encode`, with
        ``after[i]`` the last id of the text that ``texts[i]`` continues (None: unknown). Multi-
        threaded in Rust unless ``TOKENIZERS_PARALLELISM=false`` (pairpack's build workers set
        that: one thread each)."""
        if not continuation or self.join_anchor is None:
            return self._encode_plain(texts)
        anchor, head = self.join_anchor, self._anchor_ids
        n = len(head)
        got = self._encode_plain([anchor + t for t in texts])
        fresh = self.fresh_after_added and after is not None
        out = []
        for i, (t, ids) in enumerate(zip(texts, got)):
            # the anchor's ids must come out unchanged: else the tokenizer merged it with the text
            if ids[:n] != head or (fresh and after[i] in self._added_ids):  # type: ignore[index]
                ids = self._tok.encode(t, add_special_tokens=False).ids
            else:
                ids = ids[n:]
            out.append(ids)
        return out

    def decode(self, ids: Any) -> str:
        """Text of ``ids``, special tokens included."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def token_text(self, token_id: int | None) -> str:
        """The token text of ``token_id`` ("" for None): ``bos_token``/``eos_token`` in templates."""
        if token_id is None:
            return ""
        return self._tok.id_to_token(int(token_id)) or ""

    def hard_split_tokens(self) -> tuple[str, ...]:
        """Added tokens that end every text before them: matched on the raw text (not normalized),
        not single-word, absorbing no whitespace before them (no ``lstrip``), and contained in no
        other added token. The tokenizer encodes the text before such a token as it would encode
        that text alone, and the text from the token on whatever came before (so a row's ids from
        such a token on can be encoded without the text before it)."""
        if self._hard_split is None:
            added = list(self._tok.get_added_tokens_decoder().values())
            self._hard_split = tuple(
                t.content for t in added if t.content and not t.normalized and not t.lstrip and not t.single_word
                and not any(t.content in u.content for u in added if u.content != t.content))
        return self._hard_split

    def has_token(self, text: str) -> bool:
        """Whether ``text`` is one added (special) token of this tokenizer, e.g. ``<|im_start|>``."""
        return any(t.content == text for t in self._tok.get_added_tokens_decoder().values())

    def identity(self) -> dict[str, Any]:
        """Manifest "tokenizer" object (FORMAT.md §5.2): kind, name, hash, vocab_size, special ids,
        how continuations are joined, the config's hash, and the absolute path the file was read
        from (a hint for decoding; the dataset's own copy, recorded by the build under "file", is
        preferred)."""
        out = {"kind": "huggingface", "name": self.name, "hash": self.hash, "vocab_size": self.vocab_size,
               "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
               "source_path": str(self.path)}
        if self.join_anchor is not None:
            out["join_anchor"] = self.join_anchor
        if self.config_hash is not None:
            out["config_hash"] = self.config_hash
        if self.add_bos is not None:
            out["add_bos_token"] = self.add_bos
        return out


def _probe_join(encode: Callable[[Sequence[str]], list[list[int]]]) -> tuple[str | None, list[int]]:
    """(anchor, anchor ids) for a tokenizer whose separately encoded continuations differ from
    the same text encoded after other text, or (None, []) when they agree on every probe.

    A probe agrees when ``encode(anchor + p)`` is ``encode(anchor)`` followed by ``encode(p)``.
    An anchor is usable when its ids are a prefix of ``encode(anchor + p)`` for every probe.
    """
    for anchor in _JOIN_ANCHORS:
        head = encode([anchor])[0]
        if not head:
            continue
        alone = encode(list(_JOIN_PROBES))
        after = encode([anchor + p for p in _JOIN_PROBES])
        if any(a[:len(head)] != head for a in after):
            continue
        if all(a[len(head):] == b for a, b in zip(after, alone)):
            return None, []
        return anchor, head
    return None, []


def encode_continuations(tokenizer: Any, texts: Sequence[str], after: Sequence[int | None] | None = None
                         ) -> list[Any]:
    """``tokenizer.encode_batch(texts, continuation=True, after=after)`` for pairpack's
    tokenizers (``after[i]``: the last id of the prompt ``texts[i]`` follows); tokenizer objects
    of other kinds (the Python API accepts any) encode each text alone."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_batch(texts, continuation=True, after=after)
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_batch(texts, continuation=True)
    return list(tokenizer.encode_batch(texts))


def check_join(tokenizer: Any, prompt: str, completion: str) -> str:
    """How pairpack's ids for ``prompt`` + ``completion`` (prompt encoded alone, completion as a
    continuation) compare with the tokenizer's encoding of the whole row ``prompt + completion``:

    - ``"exact"``: the ids are equal;
    - ``"boundary"``: the whole row has no token boundary where the prompt ends (a token spans
      the join, e.g. a space run split across it), so no split can equal it; pairpack's ids still
      decode to the row's text;
    - ``"differs"``: the whole row has that boundary but the ids differ (a join bug).
    """
    p = [int(x) for x in tokenizer.encode(prompt)]
    c = [int(x) for x in encode_continuations(tokenizer, [completion], [p[-1] if p else None])[0]]
    whole = [int(x) for x in tokenizer.encode(prompt + completion)]
    if p + c == whole:
        return "exact"
    return "differs" if whole[:len(p)] == p else "boundary"


def decode_rows(tokenizer: Any, prompt: Any, *completions: Any) -> list[str]:
    """Texts of a pair's segments decoded as whole rows: the prompt's text, then for each
    completion the text its row adds to the prompt's (``decode(prompt + completion)`` minus the
    prompt's text). Decoding a completion alone can show a start-of-text space or marker that the
    row does not have; a row whose text does not start with its prompt's text (a tokenizer whose
    decoder changes earlier text) falls back to decoding the completion alone."""
    p = np.asarray(prompt).reshape(-1)
    pt = tokenizer.decode(p)
    out = [pt]
    for c in completions:
        c = np.asarray(c).reshape(-1)
        row = tokenizer.decode(np.concatenate([p, c]))
        out.append(row[len(pt):] if row.startswith(pt) else tokenizer.decode(c))
    return out


def describe_special(tokenizer: Any, token_id: int | None, source: str | None = None) -> str:
    """``'<s>' (id 1, from tokenizer_config.json)`` for the build summary; "none" without one."""
    if token_id is None:
        return "none"
    text = tokenizer.token_text(token_id) if hasattr(tokenizer, "token_text") else ""
    where = {"given": "given", "config": f"from {TOKENIZER_CONFIG_FILE}", "guessed": "guessed from its name"}.get(
        source or "", "")
    return f"{text!r} (id {token_id}{', ' + where if where else ''})" if text else f"id {token_id}"


def _rebuild_hf(path: str, opts: dict[str, Any], digest: str) -> HFTokenizer:
    return HFTokenizer(path, expected_hash=digest, **opts)


# "gpt2", "meta-llama/Llama-2-7b-hf": what a Hugging Face hub name looks like (never fetched)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def load_tokenizer(spec: Any, **special: Any) -> Any:
    """A tokenizer from a CLI/API value: None or ``"bytes"`` -> :class:`ByteTokenizer`; a path to a
    ``tokenizer.json``, or a model directory holding ``tokenizer.json`` (and usually
    ``tokenizer_config.json``: chat template, BOS/EOS, add_bos) -> :class:`HFTokenizer`; objects
    pass through. Nothing is downloaded: a hub name such as ``gpt2`` that is not a local path is
    refused with how to get the files."""
    if spec is None or (isinstance(spec, str) and spec in ("bytes", ByteTokenizer.name)):
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.is_dir():
            if not (p / TOKENIZER_FILE).is_file():
                has = sorted(q.name for q in p.iterdir())[:12]
                hint = (" (it holds a SentencePiece tokenizer.model, which pairpack does not read: convert it "
                        "with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
                        if (p / "tokenizer.model").is_file() else "")
                raise TokenizerError(f"{spec}: directory has no {TOKENIZER_FILE}{hint}; a model directory's "
                                     f"tokenizer is {TOKENIZER_FILE} (+ {TOKENIZER_CONFIG_FILE}). "
                                     f"Found: {', '.join(has) or 'nothing'}")
            p = p / TOKENIZER_FILE
        if not p.is_file():
            if not p.exists() and _HUB_NAME.match(str(spec)) and not str(spec).endswith(".json"):
                raise TokenizerError(
                    f"{spec}: no such file or directory. pairpack never downloads: hub names are not fetched. "
                    f"Download the model's {TOKENIZER_FILE} and {TOKENIZER_CONFIG_FILE} (e.g. `huggingface-cli "
                    f"download {spec} {TOKENIZER_FILE} {TOKENIZER_CONFIG_FILE} --local-dir {Path(str(spec)).name}`) "
                    f"and pass that directory")
            raise TokenizerError(f"{spec}: tokenizer file not found (expected a Hugging Face {TOKENIZER_FILE} "
                                 "or a model directory holding one)")
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
