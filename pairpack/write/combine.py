"""Combine finished datasets into one without copying tokens: the steps of ``pairpack merge``
(:mod:`pairpack.ops.merge`) and of the commit of a Ray build (:mod:`pairpack.ingest.ray`).

The parts' shard files are renamed or hard-linked (copied only where neither works) into
renumbered shard directories of a temp directory beside the target, their recorded sizes and
checksums reused (nothing is re-hashed); the manifest is written and checked, and the directory
is installed atomically (FORMAT.md §9 W1).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import format as fmt
from ..errors import FormatError, StateError
from ..format.fsio import _fsync_dir, install_dir, temp_path_for, write_manifest
from .writer import _widen_closed

__all__ = ["TOKEN_OPTIONS", "check_alike", "place_shards", "commit_dir", "combine_parts"]

# build options that change what the ids mean: parts must agree on them to be combined (the input
# shape, field names and templates may differ: a chat file and an HH file tokenized alike combine)
TOKEN_OPTIONS = ("add_bos", "add_eos")


def check_alike(roots: Sequence[Path], mans: Sequence[fmt.Manifest], *, same_dtype: bool = True) -> None:
    """Raise StateError unless the parts agree on everything that gives ids their meaning:
    tokenizer, special ids, columns, whether BOS/EOS were added, and (``same_dtype``) token dtype
    and vocabulary. How records were shaped (shape, field names, templates) may differ."""
    first = mans[0]
    for r, m in zip(roots[1:], mans[1:]):
        checks = [("tokenizer", fmt.tokenizer_key(first.tokenizer), fmt.tokenizer_key(m.tokenizer)), ("pad_id", first.pad_id, m.pad_id),
                  ("bos_id", first.bos_id, m.bos_id), ("eos_id", first.eos_id, m.eos_id),
                  ("columns", [c.to_json() for c in first.columns], [c.to_json() for c in m.columns])]
        if same_dtype:
            checks.append(("token_dtype", first.token_dtype, m.token_dtype))
        for what, a, b in checks:
            if a != b:
                raise StateError(f"{r}: {what} differs from {roots[0]}: {b!r} vs {a!r}; parts must be built alike")
        if first.tokenizer is not None and m.vocab_size != first.vocab_size:
            raise StateError(f"{r}: vocab_size {m.vocab_size} differs from {first.vocab_size}")
        o1, o2 = first.provenance.get("options", {}), m.provenance.get("options", {})
        for key in TOKEN_OPTIONS:
            if o1.get(key) != o2.get(key):
                raise StateError(f"{r}: build option {key!r} is {o2.get(key)!r}, but {o1.get(key)!r} in {roots[0]}; "
                                 "parts must add BOS/EOS alike")


def _place(src: Path, dst: Path, how: str, counts: Counter) -> None:
    if how == "move":
        try:
            os.rename(src, dst)
            counts["moved"] += 1
            return
        except OSError:
            pass  # another filesystem: fall through to link / copy
    if how in ("link", "move"):
        try:
            os.link(src, dst)
            counts["linked"] += 1
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
    counts["copied"] += 1


def place_shards(tmp: Path, roots: Sequence[Path], mans: Sequence[fmt.Manifest], how: str,
                 counts: Counter) -> list[fmt.ShardInfo]:
    """Every shard of every part, in order, into ``tmp`` as ``shard-00000``, ``shard-00001``, ...

    ``how``: ``"link"``, ``"move"`` or ``"copy"`` (``counts`` gets how each file got there). A
    file whose size differs from its manifest entry raises FormatError (§8 R5).
    """
    shards: list[fmt.ShardInfo] = []
    for root, m in zip(roots, mans):
        for s in m.shards:
            name = f"shard-{len(shards):05d}"
            (tmp / name).mkdir()

            def placed(e: fmt.FileEntry, root: Path = root, name: str = name) -> fmt.FileEntry:
                src = fmt.resolve_file(root, e.path)
                size = os.stat(src).st_size
                if size != e.bytes:
                    raise FormatError("file size differs from the manifest", path=src, field="bytes",
                                      expected=e.bytes, actual=size, section="§8 R5")
                rel = f"{name}/{Path(e.path).name}"
                _place(src, tmp / rel, how, counts)
                return fmt.FileEntry(rel, e.bytes, e.checksum)

            shards.append(fmt.ShardInfo(name, s.num_pairs, s.num_tokens, s.num_prompts,
                                        {k: placed(v) for k, v in s.files.items()},
                                        {k: placed(v) for k, v in s.columns.items()}))
            _fsync_dir(tmp / name)
    return shards


def commit_dir(tmp: Path, manifest: fmt.Manifest, target: Path, *, force: bool) -> None:
    """Write ``manifest`` into the finished directory ``tmp`` (checked first: never write what a
    reader refuses), make it durable and install it at ``target`` (§9 W1)."""
    write_manifest(tmp, manifest.dumps())
    install_dir(tmp, target, force=force)


def combine_parts(parts: Sequence[Path], output: Path, *, force: bool, how: str, provenance: dict[str, Any],
                  attach: Callable[[Path], dict[str, Any] | None]) -> fmt.Manifest:
    """The parts of one build (same plan, written by separate writers), in the order given, as one
    dataset at ``output``. Parts whose ids all fit uint16 are widened to uint32 when another part
    needed uint32 (a copy of those parts' token files only), as one writer would have widened them.
    ``attach(tmp)`` puts the tokenizer file in and returns the manifest's tokenizer object."""
    roots = list(parts)
    mans = [fmt.read_manifest(r) for r in roots]
    check_alike(roots, mans, same_dtype=False)
    tmp = temp_path_for(output)
    tmp.mkdir()
    try:
        shards = place_shards(tmp, roots, mans, how, Counter())
        dtype = "uint32" if any(m.token_dtype == "uint32" for m in mans) else mans[0].token_dtype
        if dtype == "uint32":
            shards = [_widen_closed(tmp, s) for s in shards]  # a no-op for uint32 shards
        first = mans[0]
        manifest = fmt.Manifest(
            num_pairs=sum(m.num_pairs for m in mans), token_dtype=dtype,
            vocab_size=max(m.vocab_size for m in mans), pad_id=first.pad_id, bos_id=first.bos_id,
            eos_id=first.eos_id, tokenizer=attach(tmp), shards=tuple(shards), columns=first.columns,
            provenance=provenance)
        commit_dir(tmp, manifest, output, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
