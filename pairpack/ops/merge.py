"""``pairpack merge``: combine built parts into one dataset without copying tokens.

Merge works on manifests: the parts' shard files are hard-linked (or moved, or copied where
links are impossible) into renumbered shard directories of the new dataset, and their recorded
sizes and checksums are reused, so no token data is copied or re-hashed. Parts must agree on
everything that gives ids their meaning (tokenizer, special ids, token dtype, columns, and the
build options that shape records)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import format as fmt
from .._version import __version__
from ..errors import DatasetExistsError, FormatError, StateError
from ..format.fsio import install_dir, temp_dir_for

__all__ = ["merge", "MergeReport"]

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
