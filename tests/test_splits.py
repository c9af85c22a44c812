"""Splits by prompt (FORMAT.md §4.5, §5.6, R18-R19) and the overlap between datasets: prompt-disjoint
on data with many pairs per prompt and on multi-completion builds, every pair once, surviving
verify, columns, pack/unpack; merge refuses (or drops with --drop-splits); the CLI commands."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.batch.loader import Loader
from pairpack.errors import ArgumentError, FormatError
from pairpack.ops.overlap import normalise, overlap
from pairpack.ops.split import split
from pairpack.write.columns import add_columns
from pairpack.write.splits import SplitSpec, write_splits

from .conftest import run_cli


def _write(path, prompts, per_prompt, seed, *, shard_bytes=600):
    """Pairs of ``prompts`` distinct prompts, ``per_prompt[k]`` pairs each, in shuffled order (so a
    prompt is stored again in later shards, and written again when not adjacent)."""
    rng = np.random.default_rng(seed)
    texts = [[int(k) + 1, 7, int(k % 5) + 2] for k in range(prompts)]
    rows = [k for k in range(prompts) for _ in range(per_prompt[k])]
    rng.shuffle(rows)
    with pairpack.Writer(path, vocab_size=300, pad_id=0, shard_bytes=shard_bytes) as w:
        for k in rows:
            w.add(texts[k], rng.integers(1, 300, 3).tolist(), rng.integers(1, 300, 3).tolist())
    return pairpack.open(path)


def _prompt_of(ds, i):
    return tuple(ds[int(i)].prompt.tolist())


def _check_split(ds, fraction, by="prompt", names=("train", "eval")):
    tr, ev = ds.split(names[0]), ds.split(names[1])
    assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(len(ds)))  # every pair once
    ptr = {_prompt_of(ds, i) for i in tr}
    pev = {_prompt_of(ds, i) for i in ev}
    if by == "prompt":
        assert not (ptr & pev)
        groups = Counter(_prompt_of(ds, i) for i in range(len(ds)))
        assert abs(len(ev) - fraction * len(ds)) <= max(groups.values()) + 0.5
    else:
        assert len(ev) == round(fraction * len(ds))
    info = ds.splits
    assert info[names[0]].num_prompts == len(ptr) and info[names[1]].num_prompts == len(pev)
    assert info[names[0]].num_pairs == len(tr) and info[names[1]].by == by
    assert pairpack.read.verify.verify_dataset(ds.path) == []


@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=25), fraction=st.floats(0, 1),
       seed=st.integers(0, 5), by=st.sampled_from(["prompt", "pair"]))
@settings(max_examples=15)
def test_split_is_prompt_disjoint_and_covers_every_pair(tmp_path_factory, sizes, fraction, seed, by):
    d = tmp_path_factory.mktemp("split")
    ds = _write(d / "ds", len(sizes), sizes, seed)
    rep = split(ds.path, eval_fraction=fraction, seed=seed, by=by)
    assert sum(n for n, _ in rep.splits.values()) == len(ds)
    _check_split(pairpack.open(ds.path), fraction, by)


def test_split_of_a_multi_completion_build(tmp_path):
    rng = np.random.default_rng(3)
    recs = []
    for k in range(40):
        n = int(rng.integers(2, 6))
        recs.append({"prompt": f"question {k % 25} about things", "responses": [f"answer {k}-{j}" for j in range(n)],
                     "scores": rng.random(n).round(3).tolist()})
    src = tmp_path / "multi.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairpack.build(src, tmp_path / "ds", pairs="best-rest", workers=1)
    split(tmp_path / "ds", eval_fraction=0.2, seed=1)
    ds = pairpack.open(tmp_path / "ds")
    _check_split(ds, 0.2)
    # the records repeat 15 prompts: the pairs of both records of a prompt are in one split
    assert len({_prompt_of(ds, i) for i in range(len(ds))}) == 25


def test_split_survives_columns_pack_unpack_and_loader(tmp_path):
    ds = _write(tmp_path / "ds", 12, [3] * 12, 0)
    split(ds.path, eval_fraction=0.25, seed=2)
    add_columns(ds.path, {"score": np.arange(len(ds), dtype=np.float32)})
    ds = pairpack.open(ds.path)
    assert set(ds.splits) == {"train", "eval"}
    _check_split(ds, 0.25)
    r = run_cli("pack", ds.path, "-o", tmp_path / "a.pairpack.zst")
    assert r.returncode == 0, r.stderr
    r = run_cli("unpack", tmp_path / "a.pairpack.zst", "-o", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back = pairpack.open(tmp_path / "back")
    assert back.split("eval").tolist() == ds.split("eval").tolist()
    served = sorted(i for b in Loader(back, batch_size=5, split="eval") for i in b.indices.tolist())
    assert served == back.split("eval").tolist()
    assert back.split("train").tolist() == [i for b in Loader(back, batch_size=4, split="train", shuffle=False)
                                            for i in b.indices.tolist()]
    # a mixture of splits
    mix = Loader({"x": ds, "y": back}, split={"x": "train", "y": "eval"}, batch_size=4)
    got = Counter((s, i) for b in mix for s, i in zip(b.source.tolist(), b.indices.tolist()))
    assert set(got) == {(0, i) for i in ds.split("train").tolist()} | {(1, i) for i in back.split("eval").tolist()}
    with pytest.raises(ArgumentError, match="no split named 'test'"):
        Loader(ds, batch_size=2, split="test")


def test_resplit_replaces_the_files(tmp_path):
    ds = _write(tmp_path / "ds", 10, [2] * 10, 0)
    split(ds.path, eval_fraction=0.3, seed=0)
    split(ds.path, eval_fraction=0.5, seed=1, by="pair", names=("fit", "holdout"))
    files = sorted(p.name.split(".")[0] for p in (ds.path / "splits").iterdir())
    assert files == ["fit", "holdout"]
    _check_split(pairpack.open(ds.path), 0.5, "pair", ("fit", "holdout"))


def test_verify_catches_bad_splits(tmp_path):
    ds = _write(tmp_path / "ds", 6, [3] * 6, 0)
    n = len(ds)
    # pairs of one prompt in two splits drawn by prompt
    i0 = [i for i in range(n) if _prompt_of(ds, i) == _prompt_of(ds, 0)]
    rest = [i for i in range(n) if i != i0[0]]
    write_splits(ds.path, [SplitSpec("a", np.array([i0[0]]), "prompt", 0, 1),
                           SplitSpec("b", np.array(rest), "prompt", 0, 6)])
    probs = pairpack.read.verify.verify_dataset(ds.path)
    assert any("R19" in p and "shares 1 prompt" in p for p in probs), probs
    # the same assignment declared by pair is sound
    write_splits(ds.path, [SplitSpec("a", np.array([i0[0]]), "pair", 0, 1),
                           SplitSpec("b", np.array(rest), "pair", 0, 6)])
    assert pairpack.read.verify.verify_dataset(ds.path) == []
    # a pair in two splits, a wrong prompt count
    write_splits(ds.path, [SplitSpec("a", np.array([0, 1]), "pair", 0, 1), SplitSpec("b", np.array([1]), "pair", 0, 1)])
    probs = pairpack.read.verify.verify_dataset(ds.path)
    assert any("pair 1 is in two splits" in p for p in probs), probs
    # a damaged split file: checksum (R12); hostile indices (R19) refused by the reader too
    write_splits(ds.path, [SplitSpec("a", np.array([0, 2]), "pair", 0, 2)])
    f = next((ds.path / "splits").iterdir())
    raw = bytearray(f.read_bytes())
    raw[-8:] = np.array([n + 5], dtype="<i8").tobytes()
    f.chmod(0o644)
    f.write_bytes(bytes(raw))
    probs = pairpack.read.verify.verify_dataset(ds.path)
    assert any("R12" in p for p in probs) and any("R19" in p for p in probs), probs
    with pytest.raises(FormatError, match="R19"):
        pairpack.open(ds.path).split("a")
    r = run_cli("verify", ds.path)
    assert r.returncode == 1 and "splits.a" in r.stderr


def test_manifest_split_declarations_are_checked(tmp_path):
    ds = _write(tmp_path / "ds", 4, [2] * 4, 0)
    split(ds.path, eval_fraction=0.5)
    m = json.loads((ds.path / "manifest.json").read_text())
    for edit, match in ((lambda s: s.update(by="random"), "by"),
                        (lambda s: s.update(name="Eval!"), "name"),
                        (lambda s: s.update(num_pairs=10**6), "num_pairs"),
                        (lambda s: s["file"].update(path="../x.npy"), "R3")):
        bad = json.loads(json.dumps(m))
        edit(bad["splits"][1])
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(FormatError, match=match):
            pairpack.format.read_manifest(tmp_path / "bad")


def test_merge_refuses_splits_unless_dropped(tmp_path):
    a = _write(tmp_path / "a", 5, [2] * 5, 0)
    b = _write(tmp_path / "b", 5, [2] * 5, 1)
    split(a.path, eval_fraction=0.4)
    r = run_cli("merge", a.path, b.path, "-o", tmp_path / "m")
    assert r.returncode == 1 and "--drop-splits" in r.stderr and not (tmp_path / "m").exists()
    r = run_cli("merge", a.path, b.path, "-o", tmp_path / "m", "--drop-splits")
    assert r.returncode == 0 and "splits dropped" in r.stdout
    assert pairpack.open(tmp_path / "m").splits == {}


def test_split_and_info_cli(tmp_path):
    ds = _write(tmp_path / "ds", 20, [1, 5] * 10, 0)
    r = run_cli("split", ds.path, "--eval-fraction", "0.1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "eval" in r.stdout and "prompts" in r.stdout
    r = run_cli("info", ds.path)
    assert "splits       train" in r.stdout
    info = json.loads(run_cli("info", ds.path, "--json").stdout)
    assert info["splits"]["eval"]["pairs"] + info["splits"]["train"]["pairs"] == len(ds)
    r = run_cli("split", ds.path, "--eval-fraction", "2")
    assert r.returncode == 2
    assert "pairpack split data/train" in run_cli("split", "--help").stdout


def test_overlap_by_ids(tmp_path):
    a = _write(tmp_path / "a", 10, [2] * 10, 0)  # prompts 1..10
    b = _write(tmp_path / "b", 15, [1] * 15, 1)  # prompts 1..15: 10 shared
    rep = overlap(a.path, b.path)
    assert (rep.by, rep.b_prompts, rep.shared_prompts, rep.b_pairs, rep.shared_pairs) == ("ids", 15, 10, 15, 10)
    r = run_cli("overlap", a.path, b.path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["shared_prompts"] == 10
    assert "10 of 15" in run_cli("overlap", a.path, b.path).stdout


def test_overlap_by_text_across_tokenizers(tmp_path, shared_dir):
    rows_a = [{"prompt": f"What is  item {k}?", "chosen": "yes", "rejected": "no"} for k in range(8)]
    rows_b = [{"prompt": f"what is item {k}?", "chosen": "a", "rejected": "b"} for k in range(4, 12)]
    for name, rows in (("a.jsonl", rows_a), ("b.jsonl", rows_b)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairpack.build(tmp_path / "a.jsonl", tmp_path / "A", workers=1)
    pairpack.build(tmp_path / "b.jsonl", tmp_path / "B", tokenizer=shared_dir / "tokenizers" / "gpt2.tokenizer.json",
                   workers=1)
    rep = overlap(tmp_path / "A", tmp_path / "B")
    assert rep.by == "text" and rep.shared_prompts == 4 and rep.b_prompts == 8
    with pytest.raises(ArgumentError, match="different tokenizers"):
        overlap(tmp_path / "A", tmp_path / "B", by="ids")
    assert normalise("  What\u00a0IS\titem ") == "what is item"


def test_force_replaces_a_dataset_with_splits_and_split_keeps_the_fingerprint(tmp_path):
    ds = _write(tmp_path / "ds", 6, [2] * 6, 0)
    before = ds.fingerprint
    split(ds.path, eval_fraction=0.3)
    assert pairpack.open(ds.path).fingerprint == before  # the pairs are untouched
    # the splits/ directory is pairpack's: --force may replace the dataset holding it (FORMAT.md W8)
    again = _write(tmp_path / "ds_new", 3, [1] * 3, 1)
    r = run_cli("merge", again.path, "-o", ds.path, "--force")
    assert r.returncode == 0, r.stderr
    assert pairpack.open(ds.path).splits == {} and not (ds.path / "splits").exists()
