"""``pairpack merge`` (parts -> one dataset, no token copies) and ``pairpack export`` (export ->
build is the identity)."""

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
from pairpack.ingest.build import build
from pairpack.errors import StateError
from pairpack.ops.export import export
from pairpack.ops.merge import merge

from .conftest import run_cli
from .strategies import pair_lists


def _pairs(ds) -> list[tuple[list[int], list[int], list[int]]]:
    return [tuple(x.tolist() for x in ds[i]) for i in range(len(ds))]


@given(pairs=pair_lists(max_pairs=25), k=st.integers(1, 4), order=st.randoms())
@settings(max_examples=12)
def test_merge_of_k_parts_equals_the_single_build(pairs, k, order):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        src = root / "in.jsonl"
        src.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
        whole = build([src], root / "whole", vocab_size=1 << 32, allow_empty=True)
        parts = [root / f"p{i}" for i in range(k)]
        for i, p in enumerate(parts):
            build([src], p, vocab_size=1 << 32, num_shards=k, shard_index=i, allow_empty=True)
        shuffled = list(parts)
        order.shuffle(shuffled)  # parts of a split are put back in shard_index order
        rep = merge(shuffled, root / "m")
        ds, ref = pairpack.open(root / "m"), pairpack.open(root / "whole")
        assert rep.pairs == whole.pairs == len(ds)
        assert _pairs(ds) == _pairs(ref)
        assert np.array_equal(ds.lengths, ref.lengths)
        assert ds.verify() == []
        assert rep.copied == 0  # hard links only


def _hh_subset(shared_dir: Path, tmp_path: Path, n: int = 600) -> Path:
    import gzip

    lines = gzip.open(shared_dir / "data" / "hh-rlhf_harmless-base_test.jsonl.gz").read().split(b"\n")
    out = tmp_path / "hh.jsonl.gz"
    out.write_bytes(gzip.compress(b"\n".join(lines[:n]) + b"\n"))
    return out


def test_merge_real_hh_links_files_and_keeps_tokenizer(tmp_path, shared_dir):
    hh = _hh_subset(shared_dir, tmp_path)
    tok = shared_dir / "tokenizers" / "gpt2.tokenizer.json"
    build([hh], tmp_path / "whole", tokenizer=tok)
    for i in range(2):
        build([hh], tmp_path / f"p{i}", tokenizer=tok, num_shards=2, shard_index=i)
    out = run_cli("merge", tmp_path / "p1", tmp_path / "p0", "-o", tmp_path / "m")
    assert out.returncode == 0, out.stderr
    m, ref = pairpack.open(tmp_path / "m"), pairpack.open(tmp_path / "whole")
    assert _pairs(m) == _pairs(ref) and m.verify() == []
    assert [s.name for s in m.manifest.shards] == ["shard-00000", "shard-00001"]
    # no token data copied: the merged files are the parts' files (same inodes)
    assert os.stat(tmp_path / "m" / "shard-00001" / "tokens.npy").st_ino == \
        os.stat(tmp_path / "p1" / "shard-00000" / "tokens.npy").st_ino
    assert m.decode(m[0].prompt) == ref.decode(ref[0].prompt)
    assert [x["part"]["shard_index"] for x in m.manifest.provenance["merged_from"]] == [0, 1]


def test_merge_refuses_incompatible_parts(tmp_path, shared_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) + "\n" for i in range(9)))
    for i in range(3):
        build([src], tmp_path / f"p{i}", num_shards=3, shard_index=i)
    build([src], tmp_path / "gpt2", tokenizer=shared_dir / "tokenizers" / "gpt2.tokenizer.json")
    build([src], tmp_path / "noeos", add_eos=False)
    build([src], tmp_path / "other-split", num_shards=2, shard_index=0)
    with pytest.raises(StateError, match="tokenizer differs"):
        merge([tmp_path / "p0", tmp_path / "gpt2"], tmp_path / "m", allow_partial=True)
    with pytest.raises(StateError, match="'add_eos'"):
        merge([tmp_path / "p0", tmp_path / "noeos"], tmp_path / "m")
    with pytest.raises(StateError, match=r"parts \[2\] of 3 are missing"):
        merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    with pytest.raises(StateError, match="more than once"):
        merge([tmp_path / "p0", tmp_path / "p0", tmp_path / "p2"], tmp_path / "m")
    with pytest.raises(StateError, match="different sizes"):
        merge([tmp_path / "p0", tmp_path / "other-split"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    rep = merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m", allow_partial=True)
    assert rep.pairs == 6 and "missing" in rep.notes[0]
    out = run_cli("merge", tmp_path / "p0", tmp_path / "gpt2", "-o", tmp_path / "m2")
    assert out.returncode == 1 and "tokenizer differs" in out.stderr and not (tmp_path / "m2").exists()


def test_merge_move_and_copy(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": [i], "chosen": [1], "rejected": [2]}) + "\n" for i in range(6)))
    for i in range(2):
        build([src], tmp_path / f"p{i}", num_shards=2, shard_index=i)
    ref = _pairs(pairpack.open(tmp_path / "p0")) + _pairs(pairpack.open(tmp_path / "p1"))
    rep = merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "c", how="copy")
    assert rep.copied == 6 and _pairs(pairpack.open(tmp_path / "c")) == ref
    rep = merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "mv", how="move")
    assert rep.moved == 6 and _pairs(pairpack.open(tmp_path / "mv")) == ref
    assert pairpack.open(tmp_path / "mv").verify() == []


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_export_then_build_is_the_identity_bytes_tokenizer(tmp_path, sample_json, suffix):
    build([sample_json], tmp_path / "ds")
    ds = pairpack.open(tmp_path / "ds")
    out = tmp_path / f"e{suffix}"
    assert export(tmp_path / "ds", out, decode=True) == len(ds)
    first = json.loads(_first_line(out))
    assert first["chosen_text"] == ds.decode(ds[0].chosen) and first["prompt"] == ds[0].prompt.tolist()
    build([out], tmp_path / "back")
    back = pairpack.open(tmp_path / "back")
    assert back.fingerprint == ds.fingerprint
    for k in ("vocab_size", "pad_id", "bos_id", "eos_id", "token_dtype", "tokenizer"):
        assert getattr(back.manifest, k) == getattr(ds.manifest, k), k


def _first_line(path: Path) -> bytes:
    import gzip

    import zstandard

    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data.split(b"\n", 1)[0]


@given(pairs=pair_lists(max_pairs=15))
@settings(max_examples=10)
def test_export_then_build_is_the_identity_ids(pairs):
    """Ids-only datasets (no tokenizer, vocabulary from the largest id): same dtype, same bytes."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        with pairpack.Writer(root / "ds", dedup_window=4, shard_bytes=1 << 20) as w:
            for p, c, r in pairs:
                w.add(p, c, r)
        ds = pairpack.open(root / "ds")
        export(root / "ds", root / "e.jsonl")
        if not pairs:  # an empty export has nothing to build from
            return
        build([root / "e.jsonl"], root / "back")
        back = pairpack.open(root / "back")
        assert back.fingerprint == ds.fingerprint and back.manifest.token_dtype == ds.manifest.token_dtype
        assert back.vocab_size == ds.vocab_size and back.pad_id == ds.pad_id


def test_export_then_build_identity_with_hf_tokenizer_via_cli(tmp_path, shared_dir):
    hh = _hh_subset(shared_dir, tmp_path)
    build([hh], tmp_path / "ds", tokenizer=shared_dir / "tokenizers" / "gpt2.tokenizer.json")
    out = run_cli("export", tmp_path / "ds", "-o", tmp_path / "e.jsonl.zst", "--decode")
    assert out.returncode == 0, out.stderr
    side = json.loads((tmp_path / "e.jsonl.zst.pairpack.json").read_text())
    assert side["vocab_size"] == 50257 and side["tokenizer_file"] == "e.jsonl.zst.tokenizer.json"
    out = run_cli("build", tmp_path / "e.jsonl.zst", "-o", tmp_path / "back")
    assert out.returncode == 0, out.stderr
    ds, back = pairpack.open(tmp_path / "ds"), pairpack.open(tmp_path / "back")
    assert back.fingerprint == ds.fingerprint
    assert back.manifest.tokenizer["hash"] == ds.manifest.tokenizer["hash"]
    assert back.decode(back[3].chosen) == ds.decode(ds[3].chosen)
    out = run_cli("export", tmp_path / "ds", "-o", tmp_path / "e.jsonl.zst")
    assert out.returncode == 1 and "already exists" in out.stderr
