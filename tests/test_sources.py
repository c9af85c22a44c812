"""Input containers: JSONL blocks and unit ranges, streamed JSON arrays, Parquet, directories,
Hugging Face ``datasets.Dataset`` objects and Python records all give the same dataset."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from tests.conftest import run_cli, write_jsonl
import pairpack.ingest.sources as sources
from pairpack.ingest.build import build
from pairpack.errors import MissingDependencyError, SourceError
from pairpack.ingest.sources import (
    JsonArraySource,
    JsonlSource,
    ParquetSource,
    RecordsSource,
    block_records,
    expand_inputs,
    open_sources,
)

RECS = [{"prompt": f"p{i % 3}", "chosen": f"c{i}", "rejected": f"r{i}", "n": i} for i in range(40)]


_jsonl = write_jsonl


def _records(src) -> list:
    return [(r.line, r.data) for b in src.blocks() for r in block_records(b)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_units_and_ranges(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 64)  # many blocks, lines cut across reads
    p = _jsonl(tmp_path / f"a{suffix}", RECS, blank_every=7)
    src = JsonlSource(p)
    n = src.units()
    assert n == len(RECS) + len(range(0, len(RECS), 7))
    full = _records(src)
    assert [d for _, d in full] == RECS
    # lines are physical line numbers (blank lines counted)
    text = (gzip.decompress(p.read_bytes()) if suffix == ".jsonl.gz" else
            zstandard.ZstdDecompressor().decompressobj().decompress(p.read_bytes()) if suffix == ".jsonl.zst"
            else p.read_bytes()).decode().split("\n")
    assert all(json.loads(text[line - 1]) == d for line, d in full)
    # any split into unit ranges partitions the records, in order
    for cuts in ([0, n], [0, 1, n], [0, 5, 6, 20, n], [0, n // 2, n]):
        parts = [[(r.line, r.data) for b in src.blocks(a, b) for r in block_records(b)] for a, b in zip(cuts, cuts[1:])]
        assert sum(parts, []) == full
    assert src.provenance()["bytes"] == p.stat().st_size


def test_jsonl_last_line_without_newline(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(RECS[0]) + "\n" + json.dumps(RECS[1]))
    src = JsonlSource(p)
    assert src.units() == 2 and [d for _, d in _records(src)] == RECS[:2]
    assert [d for b in src.blocks(1, 2) for d in [r.data for r in block_records(b)]] == [RECS[1]]


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
                            | st.floats(allow_nan=False, allow_infinity=False),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                            max_leaves=8)


@given(arr=st.lists(_json_values, max_size=12), indent=st.sampled_from([None, 0, 2]))
@example(arr=[None, [], [None, 0, ""], 0.0], indent=None)  # "0.0" cut after "0" by a read
@settings(max_examples=40)
def test_streamed_json_array_equals_json_loads(tmp_path_factory, arr, indent):
    d = tmp_path_factory.mktemp("arr")
    p = d / "a.json"
    p.write_text(json.dumps(arr, indent=indent, ensure_ascii=False))
    src = JsonArraySource(p)
    src.slurp_bytes = 0  # force the streaming parser
    old = sources.BLOCK_BYTES
    sources.BLOCK_BYTES = 7  # tiny reads: elements and numbers cross read boundaries
    try:
        got = [v for v in src._elements()]
    finally:
        sources.BLOCK_BYTES = old
    assert got == json.loads(p.read_text())
    assert src.units() == len(arr)


@pytest.mark.parametrize("text, msg", [("{}", "must hold an array"), ("[1, 2", "unterminated array"),
                                       ("[1 2]", "expected ','"), ('[{"a": }]', "element 1"), ("[1] x", "extra data")])
def test_streamed_json_array_errors(tmp_path, text, msg):
    p = tmp_path / "a.json"
    p.write_text(text)
    src = JsonArraySource(p)
    src.slurp_bytes = 0
    with pytest.raises(SourceError, match=msg) as e:
        list(src._elements())
    assert e.value.reason == "malformed_json" and e.value.path == str(p)


def test_all_containers_give_the_same_dataset(tmp_path, monkeypatch):
    """JSONL, JSON (slurped and streamed), Parquet, a directory, a datasets.Dataset and a list of
    dicts: byte-identical token files (same fingerprint)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    j = _jsonl(tmp_path / "a.jsonl", RECS)
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(RECS))
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(RECS), pqf, row_group_size=7)
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    _jsonl(d / "0.jsonl", RECS[:10])
    pq.write_table(pa.Table.from_pylist(RECS[10:25]), d / "sub" / "1.parquet")
    (d / "z.json").write_text(json.dumps(RECS[25:]))
    (d / ".hidden.jsonl").write_text("garbage\n")
    (d / "notes.txt").write_text("ignored\n")
    assert [p.name for p in expand_inputs([d])] == ["0.jsonl", "1.parquet", "z.json"]
    hf = datasets.Dataset.from_list(RECS)
    fps = {}
    for name, inp in [("jsonl", [j]), ("json", [arr]), ("parquet", [pqf]), ("dir", [d]), ("hf", hf), ("list", RECS)]:
        rep = build(inp, tmp_path / f"ds-{name}")
        assert rep.pairs == len(RECS), name
        fps[name] = pairpack.open(tmp_path / f"ds-{name}").fingerprint
    monkeypatch.setattr(JsonArraySource, "slurp_bytes", 0)
    build([arr], tmp_path / "ds-json-streamed")
    fps["json-streamed"] = pairpack.open(tmp_path / "ds-json-streamed").fingerprint
    assert len(set(fps.values())) == 1, fps
    prov = pairpack.open(tmp_path / "ds-hf").manifest.provenance["inputs"][0]
    assert prov["rows"] == len(RECS) and prov["datasets_fingerprint"] == hf._fingerprint


def test_parquet_row_ranges_and_numbering(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(RECS), p, row_group_size=6)
    src = ParquetSource(p)
    assert src.units() == len(RECS)
    got = [(r.line, r.data) for b in src.blocks(5, 23) for r in block_records(b)]
    assert got == [(i + 1, RECS[i]) for i in range(5, 23)]


def test_parquet_missing_extra_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "a.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r'pip install "pairpack\[parquet\]"'):
        ParquetSource(p).units()


def test_records_source_and_errors(tmp_path):
    src = RecordsSource(RECS[:5])
    assert src.units() == 5 and [d for _, d in _records(src)] == RECS[:5]
    assert [r.data for b in src.blocks(2, 4) for r in block_records(b)] == RECS[2:4]
    with pytest.raises(SourceError, match="input file not found"):
        open_sources([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no input files"):
        open_sources([tmp_path / "empty"])
    with pytest.raises(SourceError, match="unsupported input"):
        open_sources([42])


def test_truncated_compressed_input_is_a_clear_error(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECS))[:-20])
    with pytest.raises(SourceError, match="cannot read") as e:
        build([p], tmp_path / "ds")
    assert e.value.reason == "unreadable" and not (tmp_path / "ds").exists()


def _zst_jsonl(records: list[dict], frames: int = 1) -> bytes:
    import zstandard

    lines = [json.dumps(r).encode() + b"\n" for r in records]
    c = zstandard.ZstdCompressor(level=3)
    k = max(1, -(-len(lines) // frames))
    return b"".join(c.compress(b"".join(lines[i:i + k])) for i in range(0, len(lines), k))


def test_zst_with_several_frames_reads_every_record(tmp_path):
    recs = [{"prompt": [i + 1], "chosen": [i + 2], "rejected": [i + 3]} for i in range(50)]
    (tmp_path / "in.jsonl.zst").write_bytes(_zst_jsonl(recs, frames=7))
    ds = pairpack.open(pairpack.build([tmp_path / "in.jsonl.zst"], tmp_path / "ds").output)
    assert [ds[i].prompt.tolist() for i in range(len(ds))] == [[i + 1] for i in range(50)]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_input_is_unreadable_not_shorter(tmp_path, suffix):
    """A compressed input cut short (a full disk, a broken download) must fail the build, even
    with --skip-invalid: a quietly shorter dataset would lose the tail of the data."""
    import gzip

    recs = [{"prompt": "p" * 50 + str(i), "chosen": "c" * 80, "rejected": "r" * 70 + str(i)} for i in range(400)]
    raw = _zst_jsonl(recs) if suffix.endswith("zst") else gzip.compress(
        b"".join(json.dumps(r).encode() + b"\n" for r in recs))
    (tmp_path / f"in{suffix}").write_bytes(raw[: len(raw) * 2 // 3])
    out = run_cli("build", tmp_path / f"in{suffix}", "-o", tmp_path / "ds", "--skip-invalid")
    assert out.returncode == 1, out.stdout
    assert "cannot read" in out.stderr and str(tmp_path / f"in{suffix}") in out.stderr
    assert not (tmp_path / "ds").exists()
