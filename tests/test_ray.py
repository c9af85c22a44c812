"""pairpack.ray: builds as a Ray Data stage, on a local Ray started here (2 CPUs, no dashboard).

One Ray session serves the module (starting one takes seconds). Each job splits its records over
several write tasks (``override_num_blocks``, and ``rows_per_task=None`` by default here: a task per
block), so the parts path (staging, combine) is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from pairpack.errors import DatasetExistsError, SourceError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
import pairpack.ray as pray  # noqa: E402  (needs ray)

WORDS = "the a cat dog runs fast slow blue red green sky sea tree".split()


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def task_per_block(monkeypatch):
    """A write task per block (the sink's default bundles small jobs into one task)."""
    monkeypatch.setitem(pray.Datasink.__init__.__kwdefaults__, "rows_per_task", None)


def _dataset(records: list[dict], blocks: int = 4, ordered: bool = True):
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = ordered
    return ray.data.from_items(records, override_num_blocks=blocks)


def _text_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(max(n // 6, 1))]
    return [{"prompt": prompts[rng.integers(len(prompts))],
             "chosen": " ".join(rng.choice(WORDS, rng.integers(1, 9))),
             "rejected": " ".join(rng.choice(WORDS, rng.integers(1, 9)))} for _ in range(n)]


def _pairs(path: Path) -> list[tuple]:
    ds = pairpack.open(path)
    return [(tuple(p.prompt.tolist()), tuple(p.chosen.tolist()), tuple(p.rejected.tolist())) for p in ds]


def _alike(a: Path, b: Path) -> None:
    """Same settings: dtype, vocabulary, special ids, tokenizer (but its source path), options."""
    ma, mb = pairpack.open(a).manifest, pairpack.open(b).manifest
    assert (ma.token_dtype, ma.vocab_size, ma.pad_id, ma.bos_id, ma.eos_id) == \
        (mb.token_dtype, mb.vocab_size, mb.pad_id, mb.bos_id, mb.eos_id)
    assert ma.tokenizer == mb.tokenizer
    assert ma.provenance["options"] == mb.provenance["options"]


def _no_staging(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".pairpack-tmp-" in p.name or ".tmp-" in p.name]


def test_ordered_equals_single_build(tmp_path, shared_dir):
    """preserve_order: the pairs of the single-machine build, pair for pair; byte_identical: the
    same data files and fingerprint."""
    tok = shared_dir / "tokenizers" / "gpt2.tokenizer.json"
    recs = _text_records(600)
    one = build(recs, tmp_path / "one", tokenizer=tok, shard_bytes=4096, workers=1)
    ds = _dataset(recs)
    parts = pray.build(ds, tmp_path / "parts", tokenizer=tok, shard_bytes=4096)
    assert parts.tasks > 1 and parts.pairs == one.pairs == 600
    assert _pairs(tmp_path / "parts") == _pairs(tmp_path / "one")
    _alike(tmp_path / "parts", tmp_path / "one")
    assert pairpack.verify(tmp_path / "parts") == []
    assert parts.identical == one.identical and parts.prompt_tokens_saved > 0

    same = pray.build(ds, tmp_path / "same", tokenizer=tok, shard_bytes=4096, byte_identical=True)
    a, b = pairpack.open(tmp_path / "same").manifest, pairpack.open(tmp_path / "one").manifest
    assert a.fingerprint() == b.fingerprint()
    assert [(e.path, e.bytes, e.checksum) for e in a.files()] == [(e.path, e.bytes, e.checksum) for e in b.files()]
    assert same.prompt_tokens_saved == one.prompt_tokens_saved and same.unique_prompts == one.unique_prompts
    _alike(tmp_path / "same", tmp_path / "one")
    assert pairpack.open(tmp_path / "same").tokenizer.decode([464]) == "The"  # the dataset's copy

    # the tokenizer is loaded once per worker process, whatever the number of tasks and jobs
    sink = pray.Datasink(tmp_path / "sink", tokenizer=tok, sample=recs[:100], shard_bytes=4096)
    _dataset(recs, blocks=8).write_datasink(sink)
    assert len(sink.tasks) == 8 and {t["tokenizer_loads"] for t in sink.tasks} == {1}
    assert _pairs(tmp_path / "sink") == _pairs(tmp_path / "one")
    _no_staging(tmp_path)


def test_unordered_is_the_same_multiset(tmp_path):
    recs = _text_records(500, seed=1)
    build(recs, tmp_path / "one", workers=1)
    rep = pray.build(_dataset(recs, blocks=5, ordered=False), tmp_path / "ray")
    assert rep.pairs == 500 and pairpack.open(tmp_path / "ray").manifest.provenance["ray"]["preserve_order"] is False
    assert sorted(_pairs(tmp_path / "ray")) == sorted(_pairs(tmp_path / "one"))
    _alike(tmp_path / "ray", tmp_path / "one")


def test_ids_parts_widened_like_one_writer(tmp_path):
    """Token-id records without a vocabulary: a part whose ids fit uint16 is widened when another
    part needed uint32, as one writer widens; the vocabulary is the largest id + 1 overall."""
    recs = [{"prompt": [i % 7 + 1, 2], "chosen": [3, i], "rejected": [4]} for i in range(300)]
    recs[250]["chosen"] = [70000]
    build(recs, tmp_path / "one", workers=1)
    ds = _dataset(recs, blocks=3)
    pray.build(ds, tmp_path / "parts")
    pray.build(ds, tmp_path / "same", byte_identical=True)
    for name in ("parts", "same"):
        _alike(tmp_path / name, tmp_path / "one")
        assert _pairs(tmp_path / name) == _pairs(tmp_path / "one")
        assert pairpack.open(tmp_path / name).manifest.token_dtype == "uint32"
        assert pairpack.verify(tmp_path / name) == []
    assert pairpack.open(tmp_path / "same").fingerprint == pairpack.open(tmp_path / "one").fingerprint


def test_rejects_gathered_with_positions(tmp_path):
    recs = _text_records(400, seed=2)
    recs[3] = {"prompt": "p", "chosen": "", "rejected": "r"}
    recs[150] = {"prompt": "p", "chosen": "c"}
    recs[399] = {"prompt": "p", "chosen": 5, "rejected": "r"}
    recs[200] = {"prompt": "same", "chosen": "x", "rejected": "x"}
    one = build(recs, tmp_path / "one", skip_invalid=True, workers=1)
    rep = pray.build(_dataset(recs), tmp_path / "ray", skip_invalid=True)
    assert rep.rejected == one.rejected and sum(rep.rejected.values()) == 3
    assert (rep.pairs, rep.identical) == (one.pairs, one.identical) == (397, 1)
    got = [json.loads(x) for x in Path(rep.rejects_file).read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "one.rejects.jsonl").read_text().splitlines()]
    assert [(g["line"], g["field"], g["reason"]) for g in got] == [(w["line"], w["field"], w["reason"]) for w in want]
    assert [g["line"] for g in got] == [4, 151, 400]
    assert all(g["task_row"] <= g["line"] and g["file"] == "<ray dataset>" for g in got)
    assert json.loads(got[1]["record"]) == recs[150]
    assert "3 (" in rep.summary() and "rejects written to" in rep.summary()
    _no_staging(tmp_path)


def test_bad_record_without_skip_invalid_leaves_nothing(tmp_path):
    recs = _text_records(200, seed=3)
    recs[120] = {"prompt": "p", "chosen": "", "rejected": "r"}
    with pytest.raises(SourceError, match="field 'chosen'.*empty"):
        pray.build(_dataset(recs), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failing_task_leaves_nothing_and_keeps_the_old_dataset(tmp_path):
    recs = _text_records(300, seed=4)

    def boom(row):
        if row["rejected"] == recs[250]["rejected"] and row["chosen"] == recs[250]["chosen"]:
            raise RuntimeError("upstream stage failed")
        return row

    out = tmp_path / "out"
    with pytest.raises(Exception, match="upstream stage failed"):
        pray.build(_dataset(recs).map(boom), out)
    assert list(tmp_path.iterdir()) == []
    build(recs[:10], out, workers=1)
    fp = pairpack.open(out).fingerprint
    with pytest.raises(Exception, match="upstream stage failed"):
        _dataset(recs).map(boom).write_datasink(pray.Datasink(out, force=True))
    assert pairpack.open(out).fingerprint == fp and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_commit_leaves_nothing(tmp_path, monkeypatch):
    """An interrupt reaches past Ray's on_write_failed (it catches Exception): build cleans up."""
    import pairpack.ingest.ray as impl

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(impl, "combine_parts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pray.build(_dataset(_text_records(100, seed=6)), tmp_path / "out", skip_invalid=True)
    assert list(tmp_path.iterdir()) == []


def test_second_write_refused_without_force(tmp_path):
    recs = _text_records(100, seed=5)
    out = tmp_path / "out"
    pray.build(_dataset(recs), out)
    fp = pairpack.open(out).fingerprint
    with pytest.raises(DatasetExistsError, match="force"):
        pray.build(_dataset(recs[:50]), out)
    with pytest.raises(DatasetExistsError, match="force"):
        _dataset(recs[:50]).write_datasink(pray.Datasink(out))
    assert pairpack.open(out).fingerprint == fp
    sink = pray.Datasink(out, force=True)  # the sink alone: each task detects, the driver checks they agree
    _dataset(recs[:50]).write_datasink(sink)
    assert sink.report.pairs == len(pairpack.open(out)) == 50
    _no_staging(tmp_path)


def test_rows_per_task_bundles_blocks(tmp_path):
    recs = _text_records(400, seed=7)
    sink = pray.Datasink(tmp_path / "out", rows_per_task=200, sample=recs[:10])
    _dataset(recs, blocks=8).write_datasink(sink)
    assert [t["rows"] for t in sink.tasks] == [200, 200] and sink.report.shards == 2
    build(recs, tmp_path / "one", workers=1)
    assert _pairs(tmp_path / "out") == _pairs(tmp_path / "one")


def test_default_bundles_small_blocks_into_one_task(tmp_path, monkeypatch):
    monkeypatch.undo()  # the sink's own default (task_per_block changed it)
    assert pray.Datasink.__init__.__kwdefaults__["rows_per_task"] == pray.ROWS_PER_TASK == 10_000
    recs = _text_records(400, seed=8)
    rep = pray.build(_dataset(recs, blocks=8), tmp_path / "out")
    assert rep.pairs == 400 and rep.shards == 1
    build(recs, tmp_path / "one", workers=1)
    assert _pairs(tmp_path / "out") == _pairs(tmp_path / "one")


def test_unknown_option_named():
    with pytest.raises(TypeError, match="workers"):
        pray.Datasink("/nonexistent/x", workers=4)


@settings(max_examples=6)
@given(recs=st.lists(st.fixed_dictionaries({
    "prompt": st.lists(st.integers(1, 40), min_size=1, max_size=6),
    "chosen": st.lists(st.integers(1, 40), min_size=1, max_size=6),
    "rejected": st.lists(st.integers(1, 40), min_size=1, max_size=6)}), min_size=1, max_size=60),
    blocks=st.integers(1, 4), window=st.sampled_from([0, 2, 64]))
@example(recs=[{"prompt": [1], "chosen": [2], "rejected": [2]}] * 3, blocks=3, window=2)
def test_byte_identical_any_split(tmp_path_factory, recs, blocks, window):
    """However the records are cut into tasks, byte_identical gives the single build's files."""
    d = tmp_path_factory.mktemp("split")
    build(recs, d / "one", workers=1, shard_bytes=64, dedup_window=window, vocab_size=41)
    pray.build(_dataset(recs, blocks=min(blocks, len(recs))), d / "ray", byte_identical=True, shard_bytes=64,
               dedup_window=window, vocab_size=41)
    assert pairpack.open(d / "ray").fingerprint == pairpack.open(d / "one").fingerprint
