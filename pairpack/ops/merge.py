"""``pairpack merge``: combine built parts into one dataset without copying tokens.

Merge works on manifests (its steps are in :mod:`pairpack.write.combine`): the parts' shard files
are hard-linked (or moved, or copied where links are impossible) into renumbered shard directories
of the new dataset, and their recorded sizes and checksums are reused, so no token data is copied
or re-hashed. Parts must agree on everything that gives ids their meaning (tokenizer, special ids,
token dtype, columns, and whether BOS/EOS were added); how their records were shaped (input shape,
field names, templates) may differ, and each part's options are kept in the merged provenance."""


from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import format as fmt
from .._version import __version__
from ..errors import ArgumentError, StateError
from ..format.fsio import check_output, temp_path_for
from ..write.combine import _place, check_alike, commit_dir, place_shards

__all__ = ["merge", "MergeReport"]


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
        """What ``pairpack merge`` prints: parts, pairs, shards, and how the files were placed."""
        how = ", ".join(f"{n} {k}" for k, n in (("hard-linked", self.linked), ("moved", self.moved),
                                                ("copied", self.copied)) if n)
        lines = [f"merged {self.parts} part(s) into {self.output}: {self.pairs:,} pairs in {self.shards} shard(s); "
                 f"files {how or 'none'}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _split_order(roots: list[Path], mans: list[fmt.Manifest], allow_partial: bool,
                 notes: list[str]) -> tuple[list[Path], list[fmt.Manifest]]:
    """Parts of one ``num_shards`` split in ``shard_index`` order (checked: one split, no index
    twice, none missing unless ``allow_partial``); other datasets in the order given."""
    specs = [m.provenance.get("part") for m in mans]
    if not all(isinstance(s, dict) for s in specs):
        return roots, mans
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
        notes.append(f"parts {missing} of {k} are missing")
    order = sorted(range(len(roots)), key=lambda i: idx[i])
    return [roots[i] for i in order], [mans[i] for i in order]


def merge(parts: Sequence[str | os.PathLike], output: str | os.PathLike, *, force: bool = False,
          how: str = "link", allow_partial: bool = False, drop_splits: bool = False) -> MergeReport:
    """Combine datasets (e.g. the parts of a ``num_shards`` build) into one, without copying tokens.

    Args:
        parts: dataset directories. Parts of one ``num_shards`` split are put in ``shard_index``
            order (so the result has the input order of a single build); other datasets keep the
            order given.
        output: the new dataset directory (created atomically).
        how: ``"link"`` (hard links; copies only where linking fails), ``"move"`` (renames: the
            parts are consumed) or ``"copy"``.
        allow_partial: accept parts of a split that do not cover all of its indices.
        drop_splits: merge parts that record named splits (``pairpack split``) without them.
            Splits are not carried over: a prompt of one part's train split may be in another
            part's eval split, so the union would break their promise; without this flag such
            parts are refused (ArgumentError). Split the merged dataset again.

    Raises:
        StateError: the parts disagree on tokenizer, special ids, token dtype, columns or whether
            BOS/EOS were added, or repeat/miss parts of a split.
    """
    if how not in ("link", "move", "copy"):
        raise ArgumentError(f"how must be link, move or copy, got {how!r}")
    out = Path(output)
    check_output(out, force=force)
    if not parts:
        raise ArgumentError("nothing to merge")
    roots = [Path(p) for p in parts]
    mans = [fmt.read_manifest(r) for r in roots]
    report = MergeReport(output=str(out), parts=len(roots))
    roots, mans = _split_order(roots, mans, allow_partial, report.notes)
    check_alike(roots, mans)
    with_splits = [(r, m) for r, m in zip(roots, mans) if m.splits]
    if with_splits:
        listed = "; ".join(f"{r}: {', '.join(s.name for s in m.splits)}" for r, m in with_splits)
        if not drop_splits:
            raise ArgumentError(f"parts record named splits ({listed}): merge does not carry splits (a prompt of one "
                                f"part's train split may be in another part's eval split); pass --drop-splits "
                                f"(drop_splits=True) and run pairpack split on the merged dataset")
        report.notes.append(f"splits dropped ({listed}): run pairpack split on {out}")
    first = mans[0]
    mixed = any(m.provenance.get("options", {}) != first.provenance.get("options", {}) for m in mans[1:])
    if mixed:
        report.notes.append("parts were built with different record options (kept per part in provenance.merged_from)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    tmp.mkdir()
    try:
        counts: Counter = Counter()
        shards = place_shards(tmp, roots, mans, how, counts)
        tok = first.tokenizer
        if tok is not None and isinstance(tok.get("file"), dict):
            src = fmt.resolve_file(roots[0], tok["file"]["path"])
            _place(src, tmp / tok["file"]["path"], "copy" if how == "copy" else "link", counts)
        manifest = fmt.Manifest(
            num_pairs=sum(m.num_pairs for m in mans), token_dtype=first.token_dtype,
            vocab_size=max(m.vocab_size for m in mans), pad_id=first.pad_id, bos_id=first.bos_id,
            eos_id=first.eos_id, tokenizer=tok, shards=tuple(shards), columns=first.columns,
            provenance={"pairpack_version": __version__, "options": first.provenance.get("options", {}),
                        "mode": first.provenance.get("mode"),
                        "inputs": first.provenance.get("inputs", []),
                        "merged_from": [{"path": str(r), "fingerprint": m.fingerprint(), "num_pairs": m.num_pairs,
                                         **({"part": m.provenance["part"]} if "part" in m.provenance else {}),
                                         **({"options": m.provenance.get("options", {})} if mixed else {})}
                                        for r, m in zip(roots, mans)]})
        commit_dir(tmp, manifest, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.pairs, report.shards = manifest.num_pairs, len(shards)
    report.linked, report.moved, report.copied = counts["linked"], counts["moved"], counts["copied"]
    return report
