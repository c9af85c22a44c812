"""The manifest (FORMAT.md §5): its dataclasses, the strict parser (every field checked before use),
and path containment for the files it names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import xxhash

from ..errors import FormatError
from .npy import regular_file_size
from .spec import (
    _CHECKSUM_RE,
    CHECKSUM_KEY,
    COLUMN_DTYPES,
    COLUMN_NAME_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILES,
    MANIFEST_MAX_BYTES,
    MANIFEST_NAME,
    MAX_VOCAB,
    SHARD_NAME_RE,
    SPLIT_BY,
    SPLIT_NAME_RE,
    TOKEN_DTYPES,
    token_dtype_for_vocab,
)

__all__ = ["FileEntry", "ShardInfo", "ColumnInfo", "SplitInfo", "Manifest", "check_relpath", "parse_manifest", "read_manifest",
           "resolve_file", "tokenizer_key"]


def tokenizer_key(t: dict[str, Any] | None) -> Any:
    """A manifest tokenizer object (§5.2) without its where-abouts (``file``, ``source_path``):
    equal keys mean the same tokenizer, used the same way (merge, resume, rebuilt exports)."""
    if t is None:
        return None
    return {k: v for k, v in t.items() if k not in ("source_path", "file")}


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
class SplitInfo:
    """A named split (FORMAT.md §4.5, §5.6): its pair count, distinct prompts (by token ids), how it
    was drawn (``by``: ``"prompt"`` or ``"pair"``, ``seed``) and its file of pair indices."""

    name: str
    by: str
    seed: int
    num_pairs: int
    num_prompts: int
    file: FileEntry

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "by": self.by, "seed": self.seed, "num_pairs": self.num_pairs,
                "num_prompts": self.num_prompts, "file": self.file.to_json()}


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
    splits: tuple[SplitInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {
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
        if self.splits:  # §5.6: absent when there are none (manifests without splits keep their bytes)
            out["splits"] = [s.to_json() for s in self.splits]
        return out

    def dumps(self) -> bytes:
        """Canonical bytes of the manifest: sorted keys, 1-space indent, trailing newline (§5)."""
        return (json.dumps(self.to_json(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()

    def files(self) -> list[FileEntry]:
        """Every file the manifest names (§5.3, §5.2, §5.6): index files and columns of each shard
        in order, then the tokenizer copy when there is one, then the split files."""
        out = [e for s in self.shards
               for e in [s.files[k] for k in INDEX_FILES] + [s.columns[k] for k in sorted(s.columns)]]
        f = (self.tokenizer or {}).get("file")
        if f is not None:
            out.append(FileEntry(f["path"], f["bytes"], f[CHECKSUM_KEY]))
        return out + [s.file for s in self.splits]

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

    Checks types, ranges and cross-field consistency; never touches array files. The steps run
    in the order of §8, so a manifest with several faults reports the first rule it breaks.
    """
    obj = _json_object(data, path)
    version = _check_identity(obj, path)
    settings = _parse_settings(obj, path)
    columns = _parse_columns(obj, path)
    shards = _parse_shards(obj, path, [c.name for c in columns])
    total = sum(s.num_pairs for s in shards)
    if total != settings["num_pairs"]:
        raise FormatError("num_pairs differs from the sum over shards", path=path, field="num_pairs",
                          expected=total, actual=settings["num_pairs"], section="§8 R9")
    splits = _parse_splits(obj, path, total, {e.path for s in shards for e in (*s.files.values(),
                                                                                *s.columns.values())})
    return Manifest(**settings, shards=tuple(shards), columns=tuple(columns), format_version=version,
                    splits=tuple(splits))


def _json_object(data: bytes, path: Any) -> dict[str, Any]:
    """§8 R1: at most MANIFEST_MAX_BYTES of UTF-8 JSON holding one object (the cap is checked first)."""
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
    return obj


def _check_identity(obj: dict[str, Any], path: Any) -> int:
    """§8 R2: the format name, a version this reader knows, the checksum algorithm. Returns the version."""
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
    return version


def _parse_settings(obj: dict[str, Any], path: Any) -> dict[str, Any]:
    """§8 R9: the dataset-wide fields (§5.1-§5.2, §5.5), as :class:`Manifest` keyword arguments."""
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
    return {"num_pairs": num_pairs, "token_dtype": token_dtype, "vocab_size": vocab_size, "pad_id": pad_id,
            "bos_id": special["bos_id"], "eos_id": special["eos_id"], "tokenizer": tok, "provenance": prov}


def _named(entry: Any, what: str, pattern: Any, path: Any, fld: str, rule: str) -> str:
    """The ``name`` of a declaration object (a column, a split): an object whose name matches ``pattern``."""
    if not isinstance(entry, dict):
        raise FormatError(f"{what} must be an object", path=path, field=fld, section=rule)
    name = _req(entry, "name", str, path, fld + ".", rule)
    if not pattern.fullmatch(name):
        raise FormatError(f"bad {what} name", path=path, field=fld + ".name", actual=name, section=rule)
    return name


def _parse_columns(obj: dict[str, Any], path: Any) -> list[ColumnInfo]:
    """§8 R10: the declared per-pair columns (§5.4), names unique."""
    columns = []
    for i, c in enumerate(_req(obj, "columns", list, path, "", "§8 R10")):
        fld = f"columns[{i}]"
        name = _named(c, "column", COLUMN_NAME_RE, path, fld, "§8 R10")
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
    return columns


def _parse_shards(obj: dict[str, Any], path: Any, col_names: list[str]) -> list[ShardInfo]:
    """§8 R11 (and R3: no file named twice): the shard entries (§5.3), names unique."""
    shards = []
    seen_paths: set[str] = set()
    for i, s in enumerate(_req(obj, "shards", list, path, "")):
        shard = _parse_shard(s, f"shards[{i}]", path, col_names)
        for e in list(shard.files.values()) + list(shard.columns.values()):
            if e.path in seen_paths:
                raise FormatError("two entries name the same file", path=path, field=f"shards[{i}]",
                                  actual=e.path, section="§8 R3")
            seen_paths.add(e.path)
        shards.append(shard)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise FormatError("duplicate shard names", path=path, field="shards", section="§8 R11")
    return shards


def _parse_shard(s: Any, fld: str, path: Any, col_names: list[str]) -> ShardInfo:
    """One shard entry ``fld``: name, counts, exactly the three index files, one file per declared column."""
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
    return ShardInfo(name, n, t, u, files, cols)


def _parse_splits(obj: dict[str, Any], path: Any, num_pairs: int, taken: set[str]) -> list[SplitInfo]:
    """§8 R18 (and R3: no file named twice): the optional split declarations (§5.6)."""
    raw = obj.get("splits", [])
    if not isinstance(raw, list):
        raise FormatError("must be an array", path=path, field="splits", section="§8 R18")
    out = []
    for i, s in enumerate(raw):
        fld = f"splits[{i}]"
        name = _named(s, "split", SPLIT_NAME_RE, path, fld, "§8 R18")
        by = _req(s, "by", str, path, fld + ".", "§8 R18")
        if by not in SPLIT_BY:
            raise FormatError("unknown split rule", path=path, field=fld + ".by", expected=list(SPLIT_BY),
                              actual=by, section="§8 R18")
        seed = _nonneg(_req(s, "seed", int, path, fld + ".", "§8 R18"), path, fld + ".seed")
        n = _req(s, "num_pairs", int, path, fld + ".", "§8 R18")
        if not 0 <= n <= num_pairs:
            raise FormatError(f"out of range [0, {num_pairs}]", path=path, field=fld + ".num_pairs", actual=n,
                              section="§8 R18")
        u = _req(s, "num_prompts", int, path, fld + ".", "§8 R18")
        if not 0 <= u <= n:
            raise FormatError(f"out of range [0, {n}]", path=path, field=fld + ".num_prompts", actual=u,
                              section="§8 R18")
        entry = _file_entry(_req(s, "file", dict, path, fld + ".", "§8 R18"), path, fld + ".file")
        if entry.path in taken:
            raise FormatError("two entries name the same file", path=path, field=fld + ".file",
                              actual=entry.path, section="§8 R3")
        taken.add(entry.path)
        out.append(SplitInfo(name, by, seed, n, u, entry))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise FormatError("duplicate split names", path=path, field="splits", actual=names, section="§8 R18")
    return out


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
