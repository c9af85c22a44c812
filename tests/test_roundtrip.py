"""Round trip of the foundation: write (Writer or ``pairpack build``) -> open -> read back exactly.

Properties over generated datasets (tests/strategies.py): every pair, length and column equals
its input; the token dtype is uint16 exactly when every id fits; prompt de-duplication matches a
reference model (stored once within the window, never merging different prompts); sharding keeps
global indices; ``verify()`` finds nothing. Plus the lifecycle: pickling, close(), atomic abort,
refusing an existing path.
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from tests.conftest import write_jsonl
from pairpack.tokenization import ByteTokenizer

from .strategies import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_SHARD_BYTES,
    UINT16_LIMIT,
    DatasetSpec,
    datasets_spec,
    expected_dedup,
    pair_lists,
    scratch_dir,
    text_pair_lists,
)


# --- the shared checker ------------------------------------------------------------------------
def assert_matches_spec(ds: pairpack.Dataset, spec: DatasetSpec) -> None:
    """Every observable of ``ds`` equals what ``spec`` says a correct writer produces."""
    pairs = spec.pairs
    n = len(pairs)
    m = ds.manifest
    assert len(ds) == m.num_pairs == n
    assert m.token_dtype == spec.expected_dtype()
    assert m.vocab_size == spec.effective_vocab()
    assert ds.pad_id == spec.pad_id
    want_dtype = np.dtype(spec.expected_dtype())

    got = list(ds)  # iteration
    assert len(got) == n
    for i, (p, c, r) in enumerate(pairs):
        for pair in (got[i], ds[i], ds[i - n]):  # iteration, positive and negative index agree
            for seg, want in zip(pair, (p, c, r)):
                assert seg.dtype == want_dtype and seg.ndim == 1
                assert seg.astype(np.int64).tolist() == want

    lengths = ds.lengths
    assert lengths.dtype == np.int64 and lengths.shape == (3, n)
    assert lengths.tolist() == [[len(p) for p, _, _ in pairs], [len(c) for _, c, _ in pairs],
                                [len(r) for _, _, r in pairs]]
    assert np.array_equal(ds.prompt_lengths, lengths[0])
    assert np.array_equal(ds.chosen_lengths, lengths[1])
    assert np.array_equal(ds.rejected_lengths, lengths[2])

    assert sorted(ds.column_names) == sorted(spec.columns)
    for name, (dt, _) in spec.columns.items():
        col = ds.column(name)
        assert col.dtype == np.dtype(dt) and col.shape == (n,)
        assert np.array_equal(col, spec.column_array(name))

    # sharding: non-empty shards covering every pair in order, split by the shard_bytes rule
    sizes = [s.num_pairs for s in m.shards]
    assert all(k > 0 for k in sizes) and sum(sizes) == n
    if spec.shard_bytes == DEFAULT_SHARD_BYTES:
        assert len(sizes) == min(n, 1)
    first = np.cumsum([0] + sizes)
    for k, s in enumerate(m.shards):
        if s.num_pairs > 1:  # a shard only outgrows shard_bytes when it holds a single pair
            assert s.num_tokens * 2 <= spec.shard_bytes
        if k + 1 < len(m.shards):  # ... and the next shard's first pair did not fit (itemsize <= 4)
            p, c, r = pairs[first[k + 1]]
            assert (s.num_tokens + len(p) + len(c) + len(r)) * 4 > spec.shard_bytes

    # de-duplication: exactly the reference model, shard by shard (FORMAT.md §7.2)
    want = expected_dedup(pairs, sizes, spec.dedup_window)
    assert [(s.num_prompts, s.num_tokens) for s in m.shards] == want
    assert ds.verify() == []


# --- round trip through the Writer -------------------------------------------------------------
# shrunk / hand-picked examples kept explicit
_LATE_WIDE = DatasetSpec(pairs=[([1, 2], [3], [4]), ([1, 2], [5, 6], [7]), ([8], [9], [65536])],
                         shard_bytes=8, dedup_window=2)


@given(spec=datasets_spec())
@example(spec=DatasetSpec(pairs=[]))
@example(spec=DatasetSpec(pairs=[([65535], [65535], [0])]))
@example(spec=DatasetSpec(pairs=[([65536], [1], [2])]))
@example(spec=DatasetSpec(pairs=[([1], [2], [3])], vocab_size=UINT16_LIMIT + 1))
@example(spec=DatasetSpec(pairs=[([(1 << 32) - 1], [0], [1])]))
@example(spec=_LATE_WIDE)
@example(spec=DatasetSpec(pairs=[([5, 6], [1], [2]), ([5, 7], [1], [2]), ([5, 6], [3], [4])], dedup_window=1))
@example(spec=DatasetSpec(pairs=[([1], [2], [3])] * 4, dedup_window=0))
def test_writer_roundtrip(spec: DatasetSpec) -> None:
    with scratch_dir() as d:
        ds = spec.write(Path(d) / "ds")
        assert_matches_spec(ds, spec)


def _write_batched(spec: DatasetSpec, path: Path, cuts: list[int]) -> pairpack.Dataset:
    """Write ``spec`` with ``Writer.add_batch``, splitting the pairs at the positions ``cuts``."""
    n = len(spec.pairs)
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    with pairpack.Writer(path, **spec.writer_kwargs()) as w:
        for a, b in zip(bounds[:-1], bounds[1:]):
            chunk = spec.pairs[a:b]
            flat = [t for p, c, r in chunk for t in (*p, *c, *r)]
            lengths = np.array([[len(x[k]) for x in chunk] for k in range(3)], dtype=np.int64)
            w.add_batch(np.array(flat, dtype=np.int64), lengths,
                        {k: spec.column_array(k)[a:b] for k in spec.columns})
    return pairpack.open(path)


@given(spec=datasets_spec(), cuts=st.lists(st.integers(0, 1000), max_size=4))
@example(spec=_LATE_WIDE, cuts=[])
@example(spec=_LATE_WIDE, cuts=[1])
def test_add_batch_writes_the_same_files_as_add(spec: DatasetSpec, cuts: list[int]) -> None:
    """``Writer.add_batch`` (any split into batches) produces byte-identical files to ``Writer.add``."""
    with scratch_dir() as d:
        one = spec.write(Path(d) / "one")
        many = _write_batched(spec, Path(d) / "many", cuts)
        assert_matches_spec(many, spec)
        assert many.fingerprint == one.fingerprint
        assert [s.to_json() for s in many.manifest.shards] == [s.to_json() for s in one.manifest.shards]


def test_late_widening_rewrites_earlier_shards(tmp_path: Path) -> None:
    ds = _LATE_WIDE.write(tmp_path / "ds")
    assert len(ds.manifest.shards) == 3  # the widening happened with two shards already closed
    assert_matches_spec(ds, _LATE_WIDE)
    for s in ds.manifest.shards:
        assert np.load(tmp_path / "ds" / s.files["tokens"].path, mmap_mode="r").dtype == np.uint32


@pytest.mark.parametrize("ids, vocab, dtype", [
    ([65535], None, "uint16"),
    ([65536], None, "uint32"),
    ([1], 65536, "uint16"),
    ([1], 65537, "uint32"),  # the vocabulary decides, not the ids seen
    ([65535], 65536, "uint16"),
])
def test_token_dtype_rule(tmp_path: Path, ids: list[int], vocab: int | None, dtype: str) -> None:
    with pairpack.Writer(tmp_path / "ds", vocab_size=vocab) as w:
        w.add(ids, ids, [0])
    ds = pairpack.open(tmp_path / "ds")
    assert ds.manifest.token_dtype == dtype and ds[0].prompt.dtype == np.dtype(dtype)
    assert ds[0].prompt.tolist() == ids


# --- prompt de-duplication is exact --------------------------------------------------------------
def test_dedup_equal_length_prompts_not_merged(tmp_path: Path) -> None:
    pairs = [([7, 8, 9], [1], [2]), ([7, 8, 10], [1], [2]), ([7, 8, 9], [3], [4]), ([10, 8, 7], [5], [6])]
    spec = DatasetSpec(pairs=pairs)
    ds = spec.write(tmp_path / "ds")
    assert ds.manifest.shards[0].num_prompts == 3
    assert ds.manifest.shards[0].num_tokens == 3 * 3 + 8
    st0 = ds.segments([0, 1, 2, 3])[1][0]
    assert st0[0] == st0[2] and len({int(st0[0]), int(st0[1]), int(st0[3])}) == 3
    assert_matches_spec(ds, spec)


@given(spec=datasets_spec(max_pairs=10, columns=False, allow_long=False))
@settings(max_examples=25)
@example(spec=DatasetSpec(pairs=[([1, 2], [0], [0]), ([2, 1], [0], [0]), ([1, 2], [0], [0])]))
def test_dedup_exact_under_forced_hash_collisions(spec: DatasetSpec) -> None:
    """Every prompt hashes to the same digest: only the token comparison keeps prompts apart."""
    import pairpack.write.writer as wmod

    constant = types.SimpleNamespace(xxh3_128_digest=lambda b: b"\0" * 16)
    with scratch_dir() as d, mock.patch.object(wmod, "xxhash", constant):
        ds = spec.write(Path(d) / "ds")
        assert [(p.tolist(), c.tolist(), r.tolist()) for p, c, r in ds] == [tuple(x) for x in spec.pairs]
        sizes = [s.num_pairs for s in ds.manifest.shards]
        first = np.cumsum([0] + sizes)
        for k, s in enumerate(ds.manifest.shards):  # collisions may cost copies, never merges
            chunk = spec.pairs[first[k]:first[k + 1]]
            distinct = {tuple(p) for p, _, _ in chunk}
            assert len(distinct) <= s.num_prompts <= len(chunk)
            assert s.num_tokens >= sum(map(len, distinct)) + sum(len(c) + len(r) for _, c, r in chunk)
        assert ds.verify() == []


@pytest.mark.parametrize("window, prompts", [(0, 3), (1, 3), (2, 2), (65536, 2)])
def test_dedup_window(tmp_path: Path, window: int, prompts: int) -> None:
    spec = DatasetSpec(pairs=[([1, 1], [2], [3]), ([4, 4], [5], [6]), ([1, 1], [7], [8])], dedup_window=window)
    ds = spec.write(tmp_path / "ds")
    assert ds.manifest.shards[0].num_prompts == prompts
    assert_matches_spec(ds, spec)


# --- round trip through `pairpack build` ----------------------------------------------------------
_write_jsonl = write_jsonl


@given(pairs=pair_lists(max_pairs=10), nfiles=st.integers(1, 3),
       suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".jsonl.zst"]),
       nested=st.booleans(), give_vocab=st.booleans(),
       shard_bytes=st.one_of(st.just(DEFAULT_SHARD_BYTES), st.integers(4, 256)),
       window=st.sampled_from([DEFAULT_DEDUP_WINDOW, 0, 1, 2]))
@example(pairs=[([65535], [1], [1]), ([65535], [65536], [2])], nfiles=2, suffix=".jsonl", nested=False,
         give_vocab=False, shard_bytes=4, window=DEFAULT_DEDUP_WINDOW)
def test_build_ids_roundtrip(pairs, nfiles: int, suffix: str, nested: bool, give_vocab: bool,
                             shard_bytes: int, window: int) -> None:
    with scratch_dir() as d:
        root = Path(d)
        files = []
        for k in range(nfiles):  # pairs split over the files in order
            chunk = pairs[k * len(pairs) // nfiles:(k + 1) * len(pairs) // nfiles]
            recs = [{"q": {"p": p}, "good": c, "bad": r} if nested else {"prompt": p, "chosen": c, "rejected": r}
                    for p, c, r in chunk]
            files.append(_write_jsonl(root / f"in{k}{suffix}", recs))
        max_id = max([max(max(p), max(c), max(r)) for p, c, r in pairs] + [0])
        vocab = max_id + 7 if give_vocab and max_id + 7 <= 1 << 32 else None
        names = {"prompt": "q.p", "chosen": "good", "rejected": "bad"} if nested else {}
        rep = build(files, root / "ds", allow_empty=True, vocab_size=vocab, shard_bytes=shard_bytes, dedup_window=window,
                    **names)
        ds = pairpack.open(root / "ds")
        spec = DatasetSpec(pairs=[(list(p), list(c), list(r)) for p, c, r in pairs], vocab_size=vocab,
                           shard_bytes=shard_bytes, dedup_window=window)
        assert_matches_spec(ds, spec)  # ids verbatim: no BOS/EOS added to token-id input
        assert rep.pairs == len(pairs)
        assert rep.unique_prompts == sum(s.num_prompts for s in ds.manifest.shards)
        if shard_bytes == DEFAULT_SHARD_BYTES and window == DEFAULT_DEDUP_WINDOW:
            assert rep.unique_prompts == len({tuple(p) for p, _, _ in pairs})
        assert rep.tokens == sum(s.num_tokens for s in ds.manifest.shards)
        assert rep.identical == sum(c == r for _, c, r in pairs)
        prov = ds.manifest.provenance["inputs"]
        assert [x["path"] for x in prov] == [f.name for f in files]
        assert [x["bytes"] for x in prov] == [f.stat().st_size for f in files]


@given(pairs=text_pair_lists())
@example(pairs=[("a", "b", "c"), ("a", "é\n\x00", "☃")])
def test_build_text_roundtrip(pairs: list[tuple[str, str, str]]) -> None:
    tok = ByteTokenizer()
    with scratch_dir() as d:
        root = Path(d)
        src = _write_jsonl(root / "in.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
        build([src], root / "ds")
        ds = pairpack.open(root / "ds")
        eos = [tok.eos_id]
        want = [(list(p.encode()), list(c.encode()) + eos, list(r.encode()) + eos) for p, c, r in pairs]
        spec = DatasetSpec(pairs=want, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
        assert_matches_spec(ds, spec)
        assert ds.manifest.tokenizer == tok.identity()
        for i, (p, c, _) in enumerate(pairs):
            assert ds.decode(ds[i].prompt) == p and ds.decode(ds[i].chosen) == c + "<eos>"


def test_build_rejects_id_beyond_uint32_naming_the_line(tmp_path: Path) -> None:
    """Without --vocab-size, ids are checked against 2**32 before any cast (never wrapped)."""
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": [1], "chosen": [2], "rejected": [3]},
                                               {"prompt": [1 << 32], "chosen": [2], "rejected": [3]}])
    with pytest.raises(pairpack.SourceError) as e:
        build([src], tmp_path / "ds")
    assert e.value.line == 2 and e.value.field == "prompt" and e.value.reason == "id_range"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


# --- indexing, pickling, closing ---------------------------------------------------------------------
@given(spec=datasets_spec(min_pairs=1, max_pairs=8, allow_long=False))
def test_pickle_reopens_by_path(spec: DatasetSpec) -> None:
    with scratch_dir() as d:
        ds = spec.write(Path(d) / "ds")
        blob = pickle.dumps(ds)
        assert len(blob) < 1024  # by path, not by content
        ds2 = pickle.loads(blob)
        assert ds2 is not ds and ds2.path == ds.path and len(ds2) == len(ds)
        for i in range(-len(ds), len(ds)):
            assert all(np.array_equal(a, b) for a, b in zip(ds[i], ds2[i]))
        assert np.array_equal(ds2.lengths, ds.lengths)


def test_index_out_of_range(tmp_path: Path) -> None:
    spec = DatasetSpec(pairs=[([1], [2], [3]), ([4], [5], [6]), ([7], [8], [9])], shard_bytes=6)
    ds = spec.write(tmp_path / "ds")
    assert len(ds.manifest.shards) == 3
    assert ds[-1].prompt.tolist() == [7] and ds[-3].prompt.tolist() == [1]
    for bad in (3, -4, 1 << 40):
        with pytest.raises(IndexError):
            ds[bad]


def test_close_keeps_earlier_views_valid(tmp_path: Path) -> None:
    spec = DatasetSpec(pairs=[([1, 2, 3], [4], [5, 6]), ([1, 2, 3], [7, 8], [9])], shard_bytes=10,
                       columns={"score": ("float32", [0.5, -1.0])})
    ds = spec.write(tmp_path / "ds")
    views = [ds[0], ds[1]]
    lengths, col = ds.lengths, ds.column("score")
    ds.close()
    import gc

    gc.collect()
    assert [[s.tolist() for s in v] for v in views] == [[list(x) for x in p] for p in spec.pairs]
    assert lengths.tolist() == [[3, 3], [1, 2], [2, 1]] and col.tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="closed"):
        ds[0]
    with pairpack.open(tmp_path / "ds") as ds2:  # context manager closes too
        assert ds2[1].chosen.tolist() == [7, 8]
    with pytest.raises(ValueError, match="closed"):
        ds2.batch([0])


# --- atomicity: abort and existing paths -------------------------------------------------------------
class _Boom(Exception):
    pass


@given(spec=datasets_spec(min_pairs=1, max_pairs=8, allow_long=False), stop=st.integers(0, 8))
def test_writer_exception_leaves_nothing(spec: DatasetSpec, stop: int) -> None:
    with scratch_dir() as d:
        root = Path(d)
        with pytest.raises(_Boom):
            with pairpack.Writer(root / "ds", **spec.writer_kwargs()) as w:
                for i, (p, c, r) in enumerate(spec.pairs[:stop]):
                    w.add(p, c, r, **{k: v[i] for k, (_, v) in spec.columns.items()})
                raise _Boom
        assert os.listdir(root) == []


def test_writer_refuses_existing_path(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    DatasetSpec(pairs=[([1], [2], [3])]).write(target)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(pairpack.DatasetExistsError):
        pairpack.Writer(target)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": [9], "chosen": [8], "rejected": [7]}])
    with pytest.raises(pairpack.DatasetExistsError):
        build([src], target)
    assert pairpack.open(target)[0].prompt.tolist() == [1]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["in.jsonl"]
    build([src], target, force=True)  # force replaces it, leaving no old copy behind
    assert pairpack.open(target)[0].prompt.tolist() == [9]
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["in.jsonl"]


def test_writer_commit_refuses_path_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    w = pairpack.Writer(target)
    w.add([1], [2], [3])
    target.mkdir()
    (target / "keep.txt").write_text("someone else's")
    with pytest.raises(pairpack.DatasetExistsError):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the temp dir is gone
    assert os.listdir(target) == ["keep.txt"]


@pytest.mark.parametrize("dtype, value", [("float32", float("nan")), ("float64", float("inf")),
                                          ("float32", 1e300)])  # 1e300 overflows float32 to inf
@pytest.mark.parametrize("batched", [False, True])
def test_writer_refuses_non_finite_column_values(tmp_path: Path, dtype: str, value: float, batched: bool) -> None:
    """Found while writing these tests: Writer.add stored NaN, and verify() then failed R16 on the
    writer's own output. Now refused up front; the aborted writer leaves nothing behind."""
    with pytest.raises(ValueError, match="non-finite"):
        with pairpack.Writer(tmp_path / "ds", columns={"score": dtype}) as w:
            w.add([1], [2], [3], score=0.5)
            if batched:
                w.add_batch(np.array([1, 2, 3, 4, 5, 6]), np.ones((3, 2), dtype=np.int64),
                            {"score": np.array([0.0, value])})
            else:
                w.add([1], [2], [3], score=value)
    assert os.listdir(tmp_path) == []
