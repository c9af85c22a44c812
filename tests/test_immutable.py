"""Writers never modify an existing file in place (FORMAT.md §9 W9, issue 15).

A dataset is opened; then every writer runs on its path (a column update, a build, a merge and an
unpack replacing it, the Writer itself). Each writes new files and renames them into place, so:
the open Dataset still reads every old pair and column exactly as before, and a hard link taken
to each original file before the writers ran (same inode: an in-place write would show through
it) still holds the original bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import pairpack
from pairpack.ops.archive import pack, unpack
from pairpack.ops.merge import merge
from pairpack.ops.split import split
from pairpack.write.columns import add_columns


def _pairs(ds: pairpack.Dataset) -> list[tuple[list[int], list[int], list[int], float]]:
    score = ds.column("score")
    return [(ds[i].prompt.tolist(), ds[i].chosen.tolist(), ds[i].rejected.tolist(), float(score[i]))
            for i in range(len(ds))]


def test_writers_leave_an_open_dataset_whole(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    with pairpack.Writer(path, vocab_size=1000, columns={"score": "float32"}, shard_bytes=64) as w:
        for i in range(40):
            w.add([i % 7 + 1, 2, 3], [10 + i], [500 + i, i], score=i / 4)
    ds = pairpack.open(path)
    assert len(ds.manifest.shards) > 2
    before = _pairs(ds)
    batch_before = ds.batch(np.arange(len(ds)), columns=["score"])
    links = tmp_path / "links"
    originals = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        (links / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(f, links / rel)
        originals[rel] = f.read_bytes()

    other = tmp_path / "other"
    with pairpack.Writer(other, vocab_size=1000, columns={"score": "float32"}) as w:
        w.add([9], [8], [7], score=1.0)
    archive = tmp_path / "other.pairpack.zst"
    pack(other, archive)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": [1], "chosen": [2], "rejected": [3]}\n')

    writers = [
        ("split", lambda: split(path, eval_fraction=0.25, seed=0)),
        ("split again", lambda: split(path, eval_fraction=0.5, seed=1, by="pair")),
        ("column update", lambda: add_columns(path, {"score": np.full(40, -1.0, np.float32),
                                                     "extra": np.arange(40, dtype=np.int64)})),
        ("build --force", lambda: pairpack.build([src], path, force=True, progress=False)),
        ("merge --force", lambda: merge([other], path, force=True)),
        ("unpack --force", lambda: unpack(archive, path, force=True)),
        ("Writer(force=True)", lambda: _write_one(path)),
    ]
    for name, run in writers:
        run()
        assert pairpack.verify(path) == [], name  # the new dataset at the path is whole
        assert _pairs(ds) == before, name  # the open one still reads the old pairs
        for rel, data in originals.items():
            assert (links / rel).read_bytes() == data, f"{name} modified {rel} in place"
    got = ds.batch(np.arange(len(ds)), columns=["score"])
    for field in ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask"):
        assert np.array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(batch_before, field))), field
    assert np.array_equal(np.asarray(got.columns["score"]), np.asarray(batch_before.columns["score"]))
    assert len(pairpack.open(path)) == 1


def _write_one(path: Path) -> None:
    with pairpack.Writer(path, vocab_size=1000, force=True) as w:
        w.add([4], [5], [6])
