"""``pairpack merge`` and ``pairpack export``: combine built parts; write a dataset back out as JSONL.

Merge works on manifests: the parts' shard files are hard-linked (or moved, or copied where
links are impossible) into renumbered shard directories of the new dataset, and their recorded
sizes and checksums are reused, so no token data is copied or re-hashed. Parts must agree on
everything that gives ids their meaning (tokenizer, special ids, token dtype, columns, and the
build options that shape records).

Export writes one JSON object per pair, ``{"prompt": [ids], "chosen": [ids], "rejected": [ids]}``
plus the per-pair columns and, with ``decode``, the decoded texts, and a sidecar
``<out>.pairpack.json`` holding the dataset settings; ``pairpack build`` of the export reads the
sidecar and gives back a dataset with the same pairs, fingerprint and settings.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from . import format as fmt
from .errors import DatasetExistsError, FormatError, StateError
from .writer import install_dir, temp_dir_for

__all__ = ["merge", "MergeReport", "export", "SIDECAR_SUFFIX", "read_sidecar"]

SIDECAR_SUFFIX = ".pairpack.json"
# build options that change how records become ids: parts must agree on them to be merged
_SEMANTIC_OPTIONS = ("shape", "prompt", "chosen", "rejected", "prompt_template", "chat_template", "hh_marker",
                     "add_bos", "add_eos", "drop_identical")


@dataclass
class MergeReport:
    """What a merge did: pairs and shards written, and how the files got there."""

    output: str
    parts: int = 0
    pairs: int = 0
    shards: int = 0
    linked: int = 0
    copied: int = 0
    moved: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = ", ".join(f"{n} {k}" for k, n in (("hard-linked", self.linked), ("moved", self.moved),
                                                ("copied", self.copied)) if n)
        lines = [f"merged {self.parts} part(s) into {self.output}: {self.pairs:,} pairs in {self.shards} shard(s); "
                 f"files {how or 'none'}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _tok_key(t: dict[str, Any] | None) -> Any:
    if t is None:
        return None
    return {k: v for k, v in t.items() if k not in ("source_path", "file")}


def _place(src: Path, dst: Path, how: str, report: MergeReport) -> None:
    if how == "move":
        try:
            os.rename(src, dst)
            report.moved += 1
            return
        except OSError:
            pass  # another filesystem: fall through to link / copy
    if how in ("link", "move"):
        try:
            os.link(src, dst)
            report.linked += 1
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
    report.copied += 1


def merge(parts: Sequence[str | os.PathLike], output: str | os.PathLike, *, force: bool = False,
          how: str = "link", allow_partial: bool = False) -> MergeReport:
    """Combine datasets (e.g. the parts of a ``num_shards`` build) into one, without copying tokens.

    Args:
        parts: dataset directories. Parts of one ``num_shards`` split are put in ``shard_index``
            order (so the result has the input order of a single build); other datasets keep the
            order given.
        output: the new dataset directory (created atomically).
        how: ``"link"`` (hard links; copies only where linking fails), ``"move"`` (renames: the
            parts are consumed) or ``"copy"``.
        allow_partial: accept parts of a split that do not cover all of its indices.

    Raises:
        StateError: the parts disagree on tokenizer, special ids, token dtype, columns or
            record-shaping options, or repeat/miss parts of a split.
    """
    if how not in ("link", "move", "copy"):
        raise ValueError(f"how must be link, move or copy, got {how!r}")
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not force:
        raise DatasetExistsError(f"{out}: already exists; pass --force to replace it")
    if not parts:
        raise ValueError("nothing to merge")
    roots = [Path(p) for p in parts]
    mans = [fmt.read_manifest(r) for r in roots]
    report = MergeReport(output=str(out), parts=len(roots))
    specs = [m.provenance.get("part") for m in mans]
    if all(isinstance(s, dict) for s in specs):
        ks = {s.get("num_shards") for s in specs}
        idx = [s.get("shard_index") for s in specs]
        if len(ks) != 1:
            raise StateError(f"parts come from splits of different sizes: num_shards {sorted(map(str, ks))}")
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise StateError(f"shard index {dup} given more than once")
        k = ks.pop()
        missing = sorted(set(range(k)) - set(idx))
        if missing and not allow_partial:
            raise StateError(f"parts {missing} of {k} are missing (pass --allow-partial to merge anyway)")
        if missing:
            report.notes.append(f"parts {missing} of {k} are missing")
        order = sorted(range(len(roots)), key=lambda i: idx[i])
        roots, mans = [roots[i] for i in order], [mans[i] for i in order]
    first = mans[0]
    for r, m in zip(roots[1:], mans[1:]):
        for what, a, b in (("tokenizer", _tok_key(first.tokenizer), _tok_key(m.tokenizer)),
                           ("token_dtype", first.token_dtype, m.token_dtype), ("pad_id", first.pad_id, m.pad_id),
                           ("bos_id", first.bos_id, m.bos_id), ("eos_id", first.eos_id, m.eos_id),
                           ("columns", [c.to_json() for c in first.columns], [c.to_json() for c in m.columns])):
            if a != b:
                raise StateError(f"{r}: {what} differs from {roots[0]}: {b!r} vs {a!r}; parts must be built alike")
        if first.tokenizer is not None and m.vocab_size != first.vocab_size:
            raise StateError(f"{r}: vocab_size {m.vocab_size} differs from {first.vocab_size}")
        o1, o2 = first.provenance.get("options", {}), m.provenance.get("options", {})
        for key in _SEMANTIC_OPTIONS:
            if o1.get(key) != o2.get(key):
                raise StateError(f"{r}: build option {key!r} is {o2.get(key)!r}, but {o1.get(key)!r} in {roots[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    tmp.mkdir()
    try:
        shards: list[fmt.ShardInfo] = []
        for root, m in zip(roots, mans):
            for s in m.shards:
                name = f"shard-{len(shards):05d}"
                (tmp / name).mkdir()

                def moved(e: fmt.FileEntry) -> fmt.FileEntry:
                    src = fmt.resolve_file(root, e.path)
                    size = os.stat(src).st_size
                    if size != e.bytes:
                        raise FormatError("file size differs from the manifest", path=src, field="bytes",
                                          expected=e.bytes, actual=size, section="§8 R5")
                    rel = f"{name}/{Path(e.path).name}"
                    _place(src, tmp / rel, how, report)
                    return fmt.FileEntry(rel, e.bytes, e.checksum)

                shards.append(fmt.ShardInfo(name, s.num_pairs, s.num_tokens, s.num_prompts,
                                            {k: moved(v) for k, v in s.files.items()},
                                            {k: moved(v) for k, v in s.columns.items()}))
        tok = first.tokenizer
        if tok is not None and isinstance(tok.get("file"), dict):
            src = fmt.resolve_file(roots[0], tok["file"]["path"])
            _place(src, tmp / tok["file"]["path"], "copy" if how == "copy" else "link", report)
        manifest = fmt.Manifest(
            num_pairs=sum(m.num_pairs for m in mans), token_dtype=first.token_dtype,
            vocab_size=max(m.vocab_size for m in mans), pad_id=first.pad_id, bos_id=first.bos_id,
            eos_id=first.eos_id, tokenizer=tok, shards=tuple(shards), columns=first.columns,
            provenance={"pairpack_version": __version__, "options": first.provenance.get("options", {}),
                        "mode": first.provenance.get("mode"),
                        "inputs": first.provenance.get("inputs", []),
                        "merged_from": [{"path": str(r), "fingerprint": m.fingerprint(), "num_pairs": m.num_pairs,
                                         **({"part": m.provenance["part"]} if "part" in m.provenance else {})}
                                        for r, m in zip(roots, mans)]})
        data = manifest.dumps()
        fmt.parse_manifest(data)  # never write what a reader refuses
        with open(tmp / fmt.MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        install_dir(tmp, out, force=force)  # the writer's atomic install (FORMAT.md §9 W1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.pairs, report.shards = manifest.num_pairs, len(shards)
    return report


# --- export -------------------------------------------------------------------------------------
def _open_out(path: Path, name: str) -> Any:
    """A binary writer at ``path``, compressed as the final file ``name`` says (.zst, .gz)."""
    name = name.lower()
    if name.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "wb")
        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
    if name.endswith(".gz"):
        return gzip.open(path, "wb", compresslevel=6)
    return open(path, "wb", buffering=1 << 20)


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The export sidecar of input ``path`` (``<path>.pairpack.json``), or None."""
    p = Path(str(path) + SIDECAR_SUFFIX)
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"unreadable export sidecar ({e})", path=p, field="sidecar") from None
    return obj if isinstance(obj, dict) and obj.get("format") == "pairpack-export" else None


def export(dataset: str | os.PathLike, output: str | os.PathLike, *, decode: bool = False,
           force: bool = False) -> int:
    """Write every pair of ``dataset`` to ``output`` (``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``).

    Each line: ``{"prompt": [ids], "chosen": [ids], "rejected": [ids], <column>: value, ...}``,
    with ``prompt_text``/``chosen_text``/``rejected_text`` added when ``decode`` and the tokenizer
    is available. Beside it, ``<output>.pairpack.json`` records vocab_size, special ids,
    tokenizer identity, shard_bytes and dedup_window (and ``<output>.tokenizer.json``, a copy of
    the dataset's tokenizer file, when it has one), which ``pairpack build`` uses so that building
    the export gives back the same dataset. Returns the number of pairs written.
    """
    from .reader import open_dataset

    import orjson

    ds = open_dataset(dataset)
    out = Path(output)
    if out.exists() and not force:
        raise DatasetExistsError(f"{out}: already exists; pass --force to replace it")
    tok = ds.tokenizer if decode else None
    if decode and tok is None:
        raise StateError(f"{dataset}: the tokenizer is not available here, cannot --decode (ids are exported)")
    m = ds.manifest
    opt = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with _open_out(tmp, out.name) as f:
            for sh in ds._live():
                toks, st, ln = sh.tokens, sh.starts, sh.lengths
                cols = {k: v for k, v in sh.columns.items()}
                step = 4096
                for a in range(0, sh.info.num_pairs, step):
                    s_chunk, l_chunk = st[:, a:a + step].tolist(), ln[:, a:a + step].tolist()
                    c_chunk = {k: v[a:a + step].tolist() for k, v in cols.items()}
                    lines = []
                    for j in range(len(s_chunk[0])):
                        rec: dict[str, Any] = {}
                        for row, key in enumerate(("prompt", "chosen", "rejected")):
                            s0 = s_chunk[row][j]
                            rec[key] = toks[s0:s0 + l_chunk[row][j]]
                        for k, v in c_chunk.items():
                            rec[k] = v[j]
                        if tok is not None:
                            for key in ("prompt", "chosen", "rejected"):
                                rec[key + "_text"] = tok.decode(rec[key])
                        lines.append(orjson.dumps(rec, option=opt))
                    f.write(b"".join(lines))
                    n += len(lines)
        opts = m.provenance.get("options", {})
        side: dict[str, Any] = {
            "format": "pairpack-export", "pairpack_version": __version__, "num_pairs": n,
            "fingerprint": m.fingerprint(), "vocab_size": m.vocab_size, "pad_id": m.pad_id, "bos_id": m.bos_id,
            "eos_id": m.eos_id, "token_dtype": m.token_dtype, "tokenizer": m.tokenizer,
            "shard_bytes": opts.get("shard_bytes"), "dedup_window": opts.get("dedup_window"),
            "shards": len(m.shards), "columns": [c.to_json() for c in m.columns]}
        tf = (m.tokenizer or {}).get("file")
        if isinstance(tf, dict):
            dst = Path(str(out) + ".tokenizer.json")
            shutil.copyfile(fmt.resolve_file(ds.path, tf["path"]), dst)
            side["tokenizer_file"] = dst.name
        os.replace(tmp, out)
        Path(str(out) + SIDECAR_SUFFIX).write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n

