"""Multi-completion records: pair rules, shared completion storage (FORMAT.md §7.6), verify, CLI."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.errors import SourceError
from pairpack.ingest.multi import PairRule
from pairpack.read.verify import _tiles_with_shared_completions
from tests.conftest import run_cli

# ---------------------------------------------------------------------------------------------
# the rules


@pytest.mark.parametrize(
    ("rule", "scores", "pairs", "ties", "below"),
    [
        ("best-worst", [8, 2, 7.5, 6], [(0, 1)], 0, 0),
        ("best-worst", [3, 3], [], 1, 0),
        ("best-worst", [9, 1, 9, 1], [(0, 1)], 0, 0),  # first best, first worst
        ("best-rest", [8, 2, 7.5, 6], [(0, 1), (0, 2), (0, 3)], 0, 0),
        ("best-rest", [9, 1, 9], [(0, 1)], 1, 0),
        ("margin:0.5", [8, 2, 7.5, 6], [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1), (2, 3)], 0, 0),
        ("margin:1", [8, 2, 7.5, 6, 8], [(0, 1), (0, 3), (2, 1), (3, 1), (4, 1), (2, 3), (4, 3)], 1, 2),
        ("margin:0", [1, 1, 2], [(2, 0), (2, 1)], 1, 0),
        ("best-rest", [5], [], 0, 0),
    ],
)
def test_rules_by_hand(rule, scores, pairs, ties, below):
    assert PairRule.parse(rule).pairs(scores) == (pairs, ties, below)


@given(scores=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 3.0, 7.0]), min_size=0, max_size=7),
       rule=st.sampled_from(["best-worst", "best-rest", "margin:0", "margin:1", "margin:2.5"]))
@example(scores=[1.0, 1.0], rule="margin:0")
def test_rule_invariants(scores, rule):
    r = PairRule.parse(rule)
    pairs, ties, below = r.pairs(scores)
    n = len(scores)
    assert all(scores[c] > scores[j] for c, j in pairs)  # chosen strictly better, never a tie
    assert len(set(pairs)) == len(pairs)
    if r.kind == "margin":
        assert all(scores[c] - scores[j] >= r.margin for c, j in pairs)
        assert len(pairs) + ties + below == n * (n - 1) // 2
        assert ties == sum(a == b for a, b in itertools.combinations(scores, 2))
    elif r.kind == "best-rest":
        assert n < 2 or len(pairs) + ties == n - 1
        assert all(scores[c] == max(scores) for c, _ in pairs)
    else:
        assert len(pairs) <= 1 and (len(pairs) == 1) == (n >= 2 and max(scores) > min(scores))


@pytest.mark.parametrize("bad", ["margin:-1", "margin:x", "margin:nan", "top-2", ""])
def test_bad_rules(bad):
    with pytest.raises(ValueError, match="pair rule|margin"):
        PairRule.parse(bad)


# ---------------------------------------------------------------------------------------------
# building


def _ultrafeedback(path, n=60, seed=0, ids=False):
    """UltraFeedback-shaped records: an instruction and 4 rated completions of varied length."""
    rng = random.Random(seed)
    words = "the a model answer because which data token pair prompt score rated fine good bad".split()
    recs = []
    for i in range(n):
        comps = []
        for k in range(4):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + f" #{i}.{k}"
            resp = [ord(ch) for ch in text] if ids else text
            comps.append({"model": f"m{k}", "response": resp, "overall_score": rng.choice([2, 4.5, 6, 7.5, 9])})
        instr = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        recs.append({"instruction": [ord(ch) for ch in instr] if ids else instr, "completions": comps})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def _expected(recs, rule, eos=None):
    """The pairs (prompt, chosen, rejected) and scores the rule should produce, computed directly."""
    out = []
    r = PairRule.parse(rule)
    for rec in recs:
        scores = [c["overall_score"] for c in rec["completions"]]
        for c, j in r.pairs(scores)[0]:
            out.append((rec["instruction"], rec["completions"][c]["response"], rec["completions"][j]["response"],
                        scores[c], scores[j]))
    return out


@pytest.mark.parametrize("rule", ["best-worst", "best-rest", "margin:2"])
def test_build_text_shares_completions_and_verifies(tmp_path, rule):
    src = tmp_path / "uf.jsonl"
    recs = _ultrafeedback(src)
    rep = pairpack.build(src, tmp_path / "ds", pairs=rule, workers=1)
    ds = pairpack.open(tmp_path / "ds")
    assert ds.verify() == []
    want = _expected(recs, rule)
    assert len(ds) == rep.pairs == len(want)
    eos = ds.manifest.eos_id
    sc = np.load(tmp_path / "ds" / "shard-00000" / "score_chosen.npy")
    sr = np.load(tmp_path / "ds" / "shard-00000" / "score_rejected.npy")
    for i, (p, c, r, s_c, s_r) in enumerate(want):
        pair = ds[i]
        assert bytes(pair.prompt.tolist()).decode() == p
        assert pair.chosen[-1] == eos and bytes(pair.chosen[:-1].tolist()).decode() == c
        assert bytes(pair.rejected[:-1].tolist()).decode() == r
        assert (sc[i], sr[i]) == (s_c, s_r)
    # every distinct completion (and prompt) is stored exactly once
    used = {(k, m) for k, rec in enumerate(recs) for m in
            {x for pr in PairRule.parse(rule).pairs([c["overall_score"] for c in rec["completions"]])[0] for x in pr}}
    unique = sum(len(rec["instruction"].encode()) for k, rec in enumerate(recs)
                 if any(u[0] == k for u in used))
    unique += sum(len(recs[k]["completions"][m]["response"].encode()) + 1 for k, m in used)
    assert ds.manifest.shards[0].num_tokens == unique
    flat = sum(len(p.encode()) + len(c.encode()) + len(r.encode()) + 2 for p, c, r, _, _ in want)
    assert rep.tokens == unique and rep.completion_tokens_shared + rep.prompt_tokens_saved == flat - unique


def test_build_ids_generic_layout(tmp_path):
    src = tmp_path / "ids.jsonl"
    rows = [{"prompt": [1, 2, 3], "responses": [[4, 5], [6], [7, 8, 9]], "scores": [0.25, 0.75, 0.5]},
            {"prompt": [1, 2, 3], "responses": [[10], [11, 12]], "scores": [1, 0]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = pairpack.build(src, tmp_path / "ds", pairs="margin:0.25", vocab_size=100, workers=1)
    ds = pairpack.open(tmp_path / "ds")
    assert ds.verify() == []
    got = [(ds[i].prompt.tolist(), ds[i].chosen.tolist(), ds[i].rejected.tolist()) for i in range(len(ds))]
    assert got == [([1, 2, 3], [6], [4, 5]), ([1, 2, 3], [7, 8, 9], [4, 5]), ([1, 2, 3], [6], [7, 8, 9]),
                   ([1, 2, 3], [10], [11, 12])]
    assert rep.below_margin == 0 and rep.ties == 0
    # the prompt is stored once across both records, each completion once: 3 + 1 + 2 + 3 + 1 + 2 tokens
    assert ds.manifest.shards[0].num_tokens == 12


def test_identical_completions_are_one_segment(tmp_path):
    src = tmp_path / "same.jsonl"
    src.write_text(json.dumps({"prompt": "q", "responses": ["yes", "no", "yes"], "scores": [3, 1, 2]}) + "\n")
    rep = pairpack.build(src, tmp_path / "ds", pairs="margin:0", workers=1)
    ds = pairpack.open(tmp_path / "ds")
    assert ds.verify() == [] and rep.identical == 1 and len(ds) == 3
    rep = pairpack.build(src, tmp_path / "ds2", pairs="margin:0", drop_identical=True, workers=1)
    assert rep.identical == 1 and rep.identical_dropped == 1 and rep.pairs == 2


def test_workers_do_not_change_the_bytes(tmp_path):
    src = tmp_path / "uf.jsonl"
    _ultrafeedback(src, n=200, seed=3)
    one = pairpack.build(src, tmp_path / "a", pairs="best-rest", workers=1)
    two = pairpack.build(src, tmp_path / "b", pairs="best-rest", workers=2)
    assert one.pairs == two.pairs
    assert pairpack.open(tmp_path / "a").fingerprint == pairpack.open(tmp_path / "b").fingerprint


def test_detected_without_a_rule_defaults_to_best_worst(tmp_path):
    src = tmp_path / "uf.jsonl"
    recs = _ultrafeedback(src, n=10)
    rep = pairpack.build(src, tmp_path / "ds", workers=1)
    assert rep.pair_rule == "best-worst" and rep.pairs == len(_expected(recs, "best-worst"))


def test_no_pairs_is_an_error(tmp_path):
    src = tmp_path / "uf.jsonl"
    _ultrafeedback(src, n=5)
    with pytest.raises(SourceError, match=r"made no pair .* largest score gap in any record is 7; lower the margin"):
        pairpack.build(src, tmp_path / "ds", pairs="margin:7.5", workers=1)
    assert not (tmp_path / "ds").exists()


def test_bad_records(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "responses": ["x", "y"], "scores": [1, 2]},
        {"prompt": "b", "responses": ["x", "y"], "scores": [1]},
        {"prompt": "c", "completions": [{"response": "x", "overall_score": "high"}, {"response": "y", "score": 1}]},
        {"prompt": "d", "completions": [{"response": "x"}, {"response": "y", "score": 1}]},
    ]) + "\n")
    with pytest.raises(SourceError, match=r"bad.jsonl:2: field 'scores': 2 responses but 1 scores"):
        pairpack.build(src, tmp_path / "ds", pairs="best-worst", workers=1)
    rep = pairpack.build(src, tmp_path / "ds", pairs="best-worst", workers=1, skip_invalid=True)
    assert rep.pairs == 1 and dict(rep.rejected) == {"length_mismatch": 1, "bad_score": 1, "missing_score": 1}


def test_disk_is_the_unique_tokens(tmp_path, capsys):
    """Tokens on disk equal the unique tokens exactly; the whole dataset (index, score columns,
    headers, manifest) is printed against them."""
    src = tmp_path / "uf.jsonl"
    _ultrafeedback(src, n=300, seed=5)
    for rule in ("best-worst", "best-rest", "margin:2"):
        rep = pairpack.build(src, tmp_path / rule, pairs=rule, workers=1)
        m = pairpack.open(tmp_path / rule).manifest
        stored = sum(s.num_tokens for s in m.shards)
        assert stored == rep.tokens  # rep.tokens: the unique tokens (test_build_text_... checks it)
        with capsys.disabled():
            print(f"\n{rule}: {rep.pairs} pairs, {stored} tokens stored = unique tokens; dataset "
                  f"{rep.dataset_bytes} B = {rep.dataset_bytes / (2 * stored):.3f}x the unique tokens' bytes")


# ---------------------------------------------------------------------------------------------
# verify (R17 with shared completions)


def _layout(pairs):
    st = np.array([[p[0] for p in pairs], [p[2] for p in pairs], [p[4] for p in pairs]], dtype=np.int64)
    ln = np.array([[p[1] for p in pairs], [p[3] for p in pairs], [p[5] for p in pairs]], dtype=np.int64)
    return st, ln


def test_shared_tiling_check():
    # prompt [0,3), c1 [3,5), c2 [5,6), c3 [6,9); pairs (c1,c2), (c1,c3), (c3,c2)
    ok = [(0, 3, 3, 2, 5, 1), (0, 3, 3, 2, 6, 3), (0, 3, 6, 3, 5, 1)]
    assert _tiles_with_shared_completions(*_layout(ok), 9)
    assert not _tiles_with_shared_completions(*_layout(ok), 10)  # tokens past the last segment
    assert not _tiles_with_shared_completions(*_layout([(0, 3, 3, 2, 5, 1), (0, 3, 3, 1, 6, 3)]), 9)  # length differs
    assert not _tiles_with_shared_completions(*_layout([(0, 3, 3, 2, 5, 1), (0, 3, 0, 3, 6, 3)]), 9)  # prompt as chosen
    assert not _tiles_with_shared_completions(*_layout([(0, 3, 3, 2, 6, 3), (0, 3, 5, 1, 3, 2)]), 9)  # stored out of order


def test_verify_reports_a_broken_shared_layout(tmp_path):
    with pairpack.Writer(tmp_path / "ds", vocab_size=50) as w:
        w.add_group(np.array([1, 2]), [np.array([3]), np.array([4, 5]), np.array([6])], [(0, 1), (0, 2), (2, 1)])
    ds = pairpack.open(tmp_path / "ds")
    assert ds.verify() == [] and [ds[i].rejected.tolist() for i in range(3)] == [[4, 5], [6], [4, 5]]
    # point pair 2's rejected at the prompt: R17 (and the checksum) must fail
    f = tmp_path / "ds" / "shard-00000" / "starts.npy"
    a = np.load(f)
    a[2, 2] = 0
    raw = f.read_bytes()
    f.write_bytes(raw[:128] + a.astype("<i8").tobytes())
    problems = pairpack.open(tmp_path / "ds").verify()
    assert any("R17" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_build_and_verify(tmp_path):
    src = tmp_path / "uf.jsonl"
    _ultrafeedback(src, n=20)
    res = run_cli("build", src, "-o", tmp_path / "ds", "--pairs", "margin:0.5")
    assert res.returncode == 0, res.stderr
    assert "pairs by rule    margin:0.5" in res.stdout and "completion tokens stored once" in res.stdout
    res = run_cli("verify", tmp_path / "ds")
    assert res.returncode == 0, res.stderr
    res = run_cli("build", src, "-o", tmp_path / "none", "--pairs", "margin:20")
    assert res.returncode != 0 and "made no pair" in res.stderr and "lower the margin" in res.stderr
    res = run_cli("build", src, "-o", tmp_path / "bad", "--pairs", "top-3")
    assert res.returncode == 2 and "unknown pair rule 'top-3'" in res.stderr
    res = run_cli("build", "--help")
    assert "--pairs" in res.stdout and "best-worst" in res.stdout and "margin:X" in res.stdout


@settings(max_examples=20, deadline=None)  # each example writes and verifies a dataset
@given(groups=st.lists(st.tuples(
    st.lists(st.integers(0, 30), min_size=1, max_size=4),
    st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=4), min_size=2, max_size=4),
    st.data()), min_size=1, max_size=5), shard_bytes=st.sampled_from([8, 64, 1 << 20]))
@example(groups=[([1], [[2], [3]], None)], shard_bytes=8)
def test_groups_round_trip_and_verify(tmp_path_factory, groups, shard_bytes):
    """Any groups written with add_group read back as their pairs, verify (R13-R17) passes, and
    each shard stores a completion at most once per group."""
    path = tmp_path_factory.mktemp("g") / "ds"
    want = []
    with pairpack.Writer(path, vocab_size=31, shard_bytes=shard_bytes) as w:
        for prompt, comps, data in groups:
            n = len(comps)
            all_pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
            pairs = (data.draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=6, unique=True))
                     if data is not None else [(0, 1)])
            w.add_group(np.array(prompt), [np.array(c) for c in comps], pairs)
            want += [(prompt, comps[i], comps[j]) for i, j in pairs]
    ds = pairpack.open(path)
    assert ds.verify() == []
    assert [(ds[k].prompt.tolist(), ds[k].chosen.tolist(), ds[k].rejected.tolist()) for k in range(len(ds))] == want
