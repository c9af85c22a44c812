"""Parallel builds: byte-identical output for any number of workers, in input order; the batched
writer path equals the per-pair one; sharded parts are disjoint and cover the input; resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pairpack
import pairpack.ingest.sources as sources
from pairpack.ingest.build import build
from pairpack.errors import SourceError
from pairpack.write.writer import Writer

from .strategies import pair_lists


def _tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def _same_dataset_bytes(a: Path, b: Path) -> None:
    ta, tb = _tree(a), _tree(b)
    ma, mb = json.loads(ta.pop("manifest.json")), json.loads(tb.pop("manifest.json"))
    assert ta == tb  # every token/index/tokenizer file byte-identical
    assert ma == mb  # the manifest too (provenance records no worker count)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)  # many blocks even for small inputs
    monkeypatch.setattr(sources, "BLOCK_RECORDS", 16)


def test_real_hh_with_gpt2_identical_for_1_2_3_workers(tmp_path, shared_dir, small_blocks):
    import gzip

    lines = gzip.open(shared_dir / "data" / "hh-rlhf_harmless-base_test.jsonl.gz").read().split(b"\n")
    hh = tmp_path / "hh.jsonl.gz"
    hh.write_bytes(gzip.compress(b"\n".join(lines[1200:1700]) + b"\n"))  # holds two of the divergent records
    tok = shared_dir / "tokenizers" / "gpt2.tokenizer.json"
    reps = [build([hh], tmp_path / f"w{n}", tokenizer=tok, workers=n) for n in (1, 2, 3)]
    assert [r.workers for r in reps] == [1, 2, 3] and all(r.pairs == 500 for r in reps)
    _same_dataset_bytes(tmp_path / "w1", tmp_path / "w2")
    _same_dataset_bytes(tmp_path / "w1", tmp_path / "w3")


def test_invalid_records_and_rejects_identical_for_any_workers(tmp_path, small_blocks):
    recs = []
    for i in range(300):
        if i % 37 == 5:
            recs.append('{"broken": ')
        elif i % 41 == 7:
            recs.append(json.dumps({"prompt": [1, 2], "chosen": [], "rejected": [3]}))
        else:
            recs.append(json.dumps({"prompt": [i % 7 + 1] * 3, "chosen": [i, i + 1], "rejected": [i + 70000]}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(recs) + "\n")
    with pytest.raises(SourceError) as e1:
        build([src], tmp_path / "x", workers=1)
    with pytest.raises(SourceError) as e2:
        build([src], tmp_path / "x", workers=2)
    assert (e1.value.line, e1.value.reason) == (e2.value.line, e2.value.reason) == (6, "malformed_json")
    assert not (tmp_path / "x").exists()
    r1 = build([src], tmp_path / "a", workers=1, skip_invalid=True)
    r2 = build([src], tmp_path / "b", workers=2, skip_invalid=True)
    assert r1.rejected == r2.rejected and sum(r1.rejected.values()) == 16
    assert Path(r1.rejects_file).read_text() == Path(r2.rejects_file).read_text()
    _same_dataset_bytes(tmp_path / "a", tmp_path / "b")
    ds = pairpack.open(tmp_path / "a")
    assert ds.manifest.token_dtype == "uint32"  # widened when the first id >= 65536 appeared
    good = [json.loads(r) for r in recs if r.startswith('{"prompt"') and '"chosen": []' not in r]
    assert [ds[i].chosen.tolist() for i in range(len(ds))] == [g["chosen"] for g in good]  # input order


@given(pairs=pair_lists(max_pairs=30), workers=st.integers(2, 3))
@settings(max_examples=8)
def test_parallel_equals_serial_hypothesis(pairs, workers):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        src = root / "in.jsonl"
        src.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
        old = sources.BLOCK_BYTES
        sources.BLOCK_BYTES = 256
        try:
            build([src], root / "s", workers=1, allow_empty=True)
            build([src], root / "p", workers=workers, allow_empty=True)
        finally:
            sources.BLOCK_BYTES = old
        _same_dataset_bytes(root / "s", root / "p")
        ds = pairpack.open(root / "p")
        assert [tuple(x.tolist() for x in ds[i]) for i in range(len(ds))] == [tuple(map(list, t)) for t in pairs]


@given(pairs=pair_lists(max_pairs=25), batch=st.integers(1, 9), shard_bytes=st.sampled_from([16, 64, 1 << 20]),
       window=st.sampled_from([0, 1, 3, 1 << 16]))
@settings(max_examples=20)
def test_add_batch_equals_add_per_pair(pairs, batch, shard_bytes, window):
    """The batched writer path (used by the build) writes the same bytes as add() per pair,
    including de-duplication, shard cuts and late widening to uint32."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        kw = dict(shard_bytes=shard_bytes, dedup_window=window)
        with Writer(root / "a", **kw) as w:
            for p, c, r in pairs:
                w.add(p, c, r)
        with Writer(root / "b", **kw) as w:
            for i in range(0, len(pairs), batch):
                chunk = pairs[i:i + batch]
                toks = np.array([t for p, c, r in chunk for t in p + c + r], dtype=np.uint32)
                lens = np.array([[len(x) for x in seg] for seg in zip(*chunk)], dtype=np.int64).reshape(3, -1)
                w.add_batch(toks, lens)
        assert _tree(root / "a") == _tree(root / "b")


def test_add_batch_rejects_inconsistent_lengths(tmp_path):
    with Writer(tmp_path / "a") as w:
        with pytest.raises(ValueError, match="lengths add up"):
            w.add_batch(np.array([1, 2, 3], dtype=np.uint32), np.array([[1], [1], [2]]))
        w.add_batch(np.array([1, 2, 3], dtype=np.uint32), np.array([[1], [1], [1]]))
    assert len(pairpack.open(tmp_path / "a")) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_shard_parts_are_disjoint_and_cover_the_input(tmp_path, k):
    recs = [{"prompt": [i % 5 + 1], "chosen": [i + 1], "rejected": [i + 2]} for i in range(50)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs[:20]) + "\n\n")  # blank lines count as units
    src2 = tmp_path / "in2.json"
    src2.write_text(json.dumps(recs[20:]))
    got = []
    for i in range(k):
        rep = build([src, src2], tmp_path / f"p{i}", num_shards=k, shard_index=i)
        ds = pairpack.open(tmp_path / f"p{i}")
        got += [ds[j].chosen.tolist() for j in range(len(ds))]
        if k > 1:
            part = ds.manifest.provenance["part"]
            assert (part["num_shards"], part["shard_index"], part["units"]) == (k, i, 52)
            assert rep.part == f"{i}/{k}"
        else:
            assert "part" not in ds.manifest.provenance and rep.part is None
    assert got == [r["chosen"] for r in recs]


def test_resume_skips_a_finished_part_and_rebuilds_otherwise(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": "p", "chosen": f"c{i}", "rejected": "r"}) + "\n" for i in range(10)))
    build([src], tmp_path / "p0", num_shards=2, shard_index=0)
    before = (tmp_path / "p0" / "manifest.json").stat().st_mtime_ns
    rep = build([src], tmp_path / "p0", num_shards=2, shard_index=0, resume=True)
    assert rep.skipped and (tmp_path / "p0" / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(pairpack.DatasetExistsError, match="built differently"):
        build([src], tmp_path / "p0", num_shards=2, shard_index=1, resume=True)  # another part
    with pytest.raises(pairpack.DatasetExistsError):
        build([src], tmp_path / "p0", num_shards=2, shard_index=0)  # without --resume: refuse
    rep = build([src], tmp_path / "p0", num_shards=2, shard_index=0, resume=True, add_eos=False, force=True)
    assert not rep.skipped  # options changed: rebuilt


def test_workers_argument_validation(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(ValueError, match="workers"):
        build([src], tmp_path / "x", workers=0)
    with pytest.raises(ValueError, match="shard_index"):
        build([src], tmp_path / "x", num_shards=2, shard_index=2)
