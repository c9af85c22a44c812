"""pairpack stats: every number checked against a direct computation; padding equals the loader's."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.batch import plan as bt
from pairpack.ops import stats as S

from .conftest import run_cli

FAST = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- generated datasets: tiny vocabularies, so common prefixes and identical pairs are frequent -----------
@st.composite
def preference_data(draw: st.DrawFn) -> tuple[list[tuple[list[int], list[int], list[int]]], int]:
    vocab = draw(st.integers(2, 4), label="vocab")
    tok = st.integers(0, vocab - 1)
    prompts = draw(st.lists(st.lists(tok, min_size=1, max_size=10), min_size=1, max_size=5), label="prompts")
    pairs = []
    for _ in range(draw(st.integers(1, 24), label="n")):
        p = prompts[draw(st.integers(0, len(prompts) - 1))]
        c = draw(st.lists(tok, min_size=1, max_size=16))
        how = draw(st.sampled_from(["free", "prefix", "same"]))
        if how == "same":
            r = list(c)
        elif how == "prefix":  # rejected = a prefix of chosen + a different tail
            k = draw(st.integers(0, len(c)))
            r = c[:k] + draw(st.lists(tok, min_size=0 if k else 1, max_size=6))
        else:
            r = draw(st.lists(tok, min_size=1, max_size=16))
        pairs.append((list(p), c, r))
    shard_bytes = draw(st.sampled_from([1 << 30, 48]), label="shard_bytes")
    return pairs, shard_bytes


def _write(root: Path, data) -> pairpack.Dataset:
    pairs, shard_bytes = data
    with pairpack.Writer(root, vocab_size=4, pad_id=0, shard_bytes=shard_bytes) as w:
        for p, c, r in pairs:
            w.add(p, c, r)
    return pairpack.open(root)


@pytest.fixture
def scratch(tmp_path):
    """A fresh directory per Hypothesis example (the function-scoped tmp_path is shared by examples)."""
    made = []

    def new() -> Path:
        d = tmp_path / uuid.uuid4().hex
        made.append(d)
        return d

    yield new
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


# --- direct (slow, obvious) computations -----------------------------------------------------------------
def direct_percentile(values: list[int], q: int) -> int:
    """The smallest observed value v with at least q% of values <= v."""
    xs = sorted(values)
    k = -(-q * len(xs) // 100)  # ceil(q n / 100), in integers
    return xs[max(k, 1) - 1]


def direct_truncate(p: int, c: int, r: int, max_length: int, mct: int) -> tuple[int, int, int]:
    """The loader's rule, one token at a time: shorten the longest completion while it is above
    ``mct``; then the prompt."""
    while p + max(c, r) > max_length:
        if max(c, r) > mct:
            top = max(c, r)
            c, r = (c - 1 if c == top else c), (r - 1 if r == top else r)
        else:
            p -= 1
    return p, c, r


def direct_lcp(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def pairs_of(ds) -> list[tuple[list[int], list[int], list[int]]]:
    return [(q.prompt.tolist(), q.chosen.tolist(), q.rejected.tolist()) for q in ds]


# --- numbers vs direct computation ------------------------------------------------------------------------
@FAST
@given(data=preference_data(), lens=st.lists(st.integers(2, 40), min_size=1, max_size=4), mct=st.integers(1, 3))
@example(data=([([1], [2], [2])], 1 << 30), lens=[2], mct=1)
@example(data=([([1, 1], [2, 3, 1], [2, 3])], 48), lens=[3, 4], mct=1)
def test_stats_match_direct_computation(scratch, data, lens, mct):
    lens = [max(n, mct + 1) for n in lens]  # the loader needs room for one prompt token
    ds = _write(scratch(), data)
    s = S.compute_stats(ds, max_lengths=lens, padding=False, min_completion_tokens=mct)
    pairs = pairs_of(ds)
    n = len(pairs)
    P = [len(p) for p, _, _ in pairs]
    C = [len(c) for _, c, _ in pairs]
    R = [len(r) for _, _, r in pairs]
    rows = {"prompt": P, "chosen": C, "rejected": R, "prompt+chosen": [a + b for a, b in zip(P, C)],
            "prompt+rejected": [a + b for a, b in zip(P, R)], "pair": [a + max(b, c) for a, b, c in zip(P, C, R)]}
    for name, xs in rows.items():
        got = s.lengths[name]
        for q in (50, 90, 99):
            assert got[f"p{q}"] == direct_percentile(xs, q), (name, q)
        assert got["max"] == max(xs) and got["min"] == min(xs)
        assert math.isclose(got["mean"], sum(xs) / n)
        assert sum(got["hist"]["counts"]) == sum(1 for x in xs if x <= got["p99"])

    assert s.identical_before == sum(c == r for _, c, r in pairs)
    for row in s.truncation:
        L = row["max_length"]
        cut = [direct_truncate(len(p), len(c), len(r), L, mct) for p, c, r in pairs]
        assert row["truncated"] == sum(len(p) + max(len(c), len(r)) > L for p, c, r in pairs)
        same = [(c2 < len(c) or r2 < len(r)) and c[:c2] == r[:r2]
                for (p, c, r), (_, c2, r2) in zip(pairs, cut)]
        assert row["become_identical"] == sum(same)
        assert row["were_identical"] == sum(s_ and c == r for s_, (_, c, r) in zip(same, pairs))
        # the loader's own token comparison agrees
        assert row["become_identical"] == int(bt.identical_after_truncation(ds, max_length=L,
                                                                            min_completion_tokens=mct).sum())
        total = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
        kept = sum(2 * a + b + c for a, b, c in cut)
        assert (row["tokens_total"], row["tokens_dropped"]) == (total, total - kept)

    d = s.delta
    diffs = [len(c) - len(r) for _, c, r in pairs]
    assert (d["chosen_longer"], d["equal"], d["chosen_shorter"]) == (
        sum(x > 0 for x in diffs), sum(x == 0 for x in diffs), sum(x < 0 for x in diffs))
    assert math.isclose(d["mean"], sum(diffs) / n)
    assert d["p50"] == direct_percentile(diffs, 50)
    assert sum(d["hist"]["counts"]) == n
    edges = d["hist"]["edges"]
    assert len(edges) % 2 == 0 and math.isclose(edges[len(edges) // 2 - 1] + edges[len(edges) // 2], 0)

    # prompt sharing as stored: identical prompts share one copy within a shard (window >> pairs)
    shard_of = np.repeat(np.arange(len(ds.manifest.shards)), [sh.num_pairs for sh in ds.manifest.shards])
    groups: dict[tuple[int, tuple[int, ...]], int] = {}
    for k, (p, _, _) in zip(shard_of.tolist(), pairs):
        groups[(k, tuple(p))] = groups.get((k, tuple(p)), 0) + 1
    sh = s.sharing
    assert sh["prompts"] == len(groups) == sum(x.num_prompts for x in ds.manifest.shards)
    assert sh["max_pairs_per_prompt"] == max(groups.values())
    assert sh["pairs_with_shared_prompt"] == sum(v for v in groups.values() if v > 1)
    assert sh["prompt_tokens_saved"] == sum((v - 1) * len(key[1]) for key, v in groups.items())
    assert sum(sh["prompts_by_pairs"].values()) == sh["prompts"]


@FAST
@given(a=st.lists(st.integers(0, 2), min_size=0, max_size=300), b=st.lists(st.integers(0, 2), max_size=300))
@example(a=[1] * 300, b=[1] * 299)  # a long common prefix crosses several comparison windows
def test_common_prefix_lengths(a, b):
    tokens = np.array(a + b + [0], dtype=np.uint16)
    limit = min(len(a), len(b))
    got = S.common_prefix_lengths(tokens, np.array([0, 0]), np.array([len(a), 0]), np.array([limit, len(a)]))
    assert got.tolist() == [direct_lcp(a, b), len(a)]


def test_common_prefix_every_mismatch_position():
    """One pair per mismatch position 0..399 and one equal pair: covers every window boundary."""
    n = 400
    base = np.zeros(n, dtype=np.uint16)
    tokens = np.concatenate([base] + [np.where(np.arange(n) == k, 1, 0).astype(np.uint16) for k in range(n)])
    b = n + n * np.arange(n)
    got = S.common_prefix_lengths(tokens, np.zeros(n + 1, dtype=np.int64), np.append(b, 0), np.full(n + 1, n))
    assert got.tolist() == list(range(n)) + [n]


def test_common_prefix_budget_rounds(monkeypatch):
    """Many pairs with long common prefixes: the gather budget splits rounds, the result stays exact."""
    monkeypatch.setattr(S, "_GATHER_BUDGET", 64)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 2, int(rng.integers(1, 90))).tolist() for _ in range(40)]
    others = [s[: int(rng.integers(0, len(s) + 1))] + rng.integers(0, 2, 5).tolist() for s in seqs]
    flat, a, b = [], [], []
    for s, o in zip(seqs, others):
        a.append(len(flat))
        flat += s
        b.append(len(flat))
        flat += o
    lim = np.minimum([len(s) for s in seqs], [len(o) for o in others])
    got = S.common_prefix_lengths(np.array(flat, dtype=np.uint16), np.array(a), np.array(b), lim)
    assert got.tolist() == [direct_lcp(s, o) for s, o in zip(seqs, others)]


def test_default_candidates_and_suggestion():
    x = np.arange(1, 1001)  # p50 500, p90 900, p99 990
    assert S.default_max_lengths(x) == [128, 256, 512, 960, 1024]
    assert S.suggest_max_length(x) == 1024  # smallest multiple of 64 >= 990
    assert (x <= S.suggest_max_length(x)).mean() >= 0.99
    assert S.default_max_lengths(np.array([3, 3, 3]), min_completion_tokens=1) == [2, 4, 64]


# --- padding: the numbers training sees ---------------------------------------------------------------------
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=preference_data(), batch=st.one_of(st.tuples(st.just("batch_size"), st.integers(1, 6)),
                                               st.tuples(st.just("max_tokens"), st.integers(8, 120))),
       max_length=st.one_of(st.none(), st.integers(2, 30)), seed=st.integers(0, 3))
@example(data=([([1], [2, 3], [2, 3, 1])], 1 << 30), batch=("batch_size", 1), max_length=2, seed=0)
def test_padding_efficiency_equals_iterating_the_loader(scratch, data, batch, max_length, seed):
    ds = _write(scratch(), data)
    kw = {batch[0]: batch[1]}
    row = S.padding_row(ds, max_length, batch_size=kw.get("batch_size"), max_tokens=kw.get("max_tokens"), seed=seed)
    for name, grouped in (("random", False), ("grouped", True)):
        ld = pairpack.Loader(ds, **kw, seed=seed, group_by_length=grouped, max_length=max_length,
                             rank=0, world_size=1)
        real = padded = nb = 0
        for b in ld:
            real += b.real_tokens()
            padded += b.padded_tokens()
            nb += 1
        assert row[name] == (real / padded if padded else 1.0), name
        assert row[f"{name}_batches"] == nb
    assert row["dropped_identical"] == ld.counts["dropped_identical"]
    assert row["random"] <= row["ceiling"] + 1e-12 and row["grouped"] <= row["ceiling"] + 1e-12


# --- the whole command on the bundled sample ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_ds(sample_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "sample"
    pairpack.build([sample_json], out, prompt="instruction")
    return out


def test_cli_text_and_json(sample_ds):
    r = run_cli("stats", sample_ds, "--max-length", "128", "--max-length", "256")
    assert r.returncode == 0, r.stderr
    for section in ("lengths (tokens", "truncation", "padding efficiency", "chosen - rejected", "prompt sharing"):
        assert section in r.stdout
    assert any(ch in r.stdout for ch in S.SPARK[1:])
    r = run_cli("stats", sample_ds, "--max-length", "128", "--batch-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ds = pairpack.open(sample_ds)
    assert out["num_pairs"] == len(ds) == 1100
    assert out["lengths"]["pair"]["max"] == int((ds.lengths[0] + ds.lengths[1:].max(axis=0)).max())
    assert [t["max_length"] for t in out["truncation"]] == [128]
    assert [p["max_length"] for p in out["padding"]] == [None, 128]
    assert out["batching"]["batch_size"] == 8
    assert out["sharing"]["prompts"] == 954  # the build's unique prompts
    assert out["suggested_max_length"] % 64 == 0


def test_cli_usage_errors(sample_ds):
    r = run_cli("stats", sample_ds, "--batch-size", "8", "--max-tokens", "1024")
    assert r.returncode == 2 and "not both" in r.stderr
    r = run_cli("stats", sample_ds, "--max-length", "1")
    assert r.returncode == 2
    r = run_cli("stats", sample_ds, "--max-tokens", "4", "--min-completion-tokens", "2")
    assert r.returncode == 2 and "cannot hold even one pair" in r.stderr and "Traceback" not in r.stderr


def test_stats_imports_no_torch(sample_ds):
    code = ("import sys, pairpack, pairpack.ops.stats as s; r = s.compute_stats(pairpack.open(sys.argv[1])); "
            "assert r.padding and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    r = subprocess.run([sys.executable, "-c", code, str(sample_ds)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_plot_png(sample_ds, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "stats.png"
    r = run_cli("stats", sample_ds, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert f"plot written to {png}" in r.stdout
    w, h = _png_size(png)
    assert (w, h) == (1300, 360)  # figsize (13, 3.6) at 100 dpi
    assert 10_000 < png.stat().st_size < 200_000


def test_plot_without_matplotlib(sample_ds, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pairpack.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = CliRunner().invoke(main, ["stats", str(sample_ds), "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert 'pip install "pairpack[plot]"' in res.output
    assert not (tmp_path / "x.png").exists()


def test_info_and_stats_report_the_same_percentiles(tmp_path):
    """One definition: on prompt lengths [1, 2, 3, 10, 100] both say p99 = 100 (an interpolated p99
    would be 96.4, shorter than the pair it is meant to keep whole)."""
    with pairpack.Writer(tmp_path / "ds", vocab_size=10) as w:
        for n in (1, 2, 3, 10, 100):
            w.add([1] * n, [2], [3])
    info = json.loads(run_cli("info", tmp_path / "ds", "--json").stdout)["lengths"]["prompt"]
    stats = json.loads(run_cli("stats", tmp_path / "ds", "--json").stdout)["lengths"]["prompt"]
    assert S.percentiles(np.array([1, 2, 3, 10, 100]), [50, 90, 99]) == [3, 100, 100]
    for k in ("p50", "p90", "p99"):
        assert info[k] == stats[k] == direct_percentile([1, 2, 3, 10, 100], int(k[1:])), k
