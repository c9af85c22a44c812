"""Mixtures in pairpack.Loader: exact per-source counts, the repetition rule, ranks, resume,
determinism, every layout, refusals (tokenizers, states of another mixture)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.batch.loader import Loader
from pairpack.batch.mixture import apportion
from pairpack.batch.plan import remove_served
from pairpack.errors import ArgumentError, PairpackError, StateError

SIZES = {"a": 40, "b": 15, "c": 6}


def _write(path, n, seed, *, vocab_size=300, pad_id=0, tokenizer=None):
    rng = np.random.default_rng(seed)
    prompt = None
    with pairpack.Writer(path, vocab_size=vocab_size, pad_id=pad_id, tokenizer=tokenizer, shard_bytes=1500) as w:
        for _ in range(n):
            if prompt is None or rng.random() < 0.5:
                prompt = rng.integers(1, 300, rng.integers(1, 25)).tolist()
            w.add(prompt, rng.integers(1, 300, rng.integers(1, 25)).tolist(),
                  rng.integers(1, 300, rng.integers(1, 25)).tolist())
    return pairpack.open(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return {k: _write(d / k, n, seed) for seed, (k, n) in enumerate(SIZES.items())}


def _pairs(ld: Loader, upto: int | None = None) -> list[tuple[int, int]]:
    """(source, index) of every pair of the next ``upto`` batches, in order."""
    out = []
    for b in islice(iter(ld), upto):
        out += list(zip(b.source.tolist(), b.indices.tolist()))
    return out


def _drawn(ld: Loader) -> list[tuple[int, int]]:
    """(source, index) of every pair this rank's plan holds (no batch assembled)."""
    return [tuple(x) for b in ld.batches() for x in np.stack(ld.locate(b), axis=1).tolist()]


weights_st = st.lists(st.integers(0, 5), min_size=3, max_size=3).filter(lambda w: sum(w) > 0)


@given(weights=weights_st, epoch_size=st.integers(1, 200), seed=st.integers(0, 3), epoch=st.integers(0, 2),
       cut=st.integers(0, 5))
@settings(max_examples=30)
def test_exact_counts_and_repetition_rule(sources, weights, epoch_size, seed, epoch, cut):
    """Each source gives its share of epoch_size exactly (within 1 of the quota); a source drawn at
    most its size repeats nothing, otherwise every pair is drawn the same number of times +- 1.
    Per-source indices change the pool sizes."""
    idx = {"a": np.arange(0, 40, 1 + cut)}  # a subset of source a
    ld = Loader(sources, weights=weights, epoch_size=epoch_size, batch_size=7, seed=seed, indices=idx)
    ld.set_epoch(epoch)
    drawn = _drawn(ld)
    assert len(drawn) == epoch_size
    per = Counter(s for s, _ in drawn)
    w = np.asarray(weights, dtype=float) / sum(weights)
    for s, name in enumerate(ld.names):
        assert abs(per.get(s, 0) - epoch_size * w[s]) < 1
        assert ld.source_counts()[name] == per.get(s, 0)
    pools = {0: set(idx["a"].tolist()), 1: set(range(15)), 2: set(range(6))}
    times = Counter(drawn)
    for s, pool in pools.items():
        assert {i for (t, i) in times if t == s} <= pool
        counts = [times.get((s, i), 0) for i in pool]
        if per.get(s, 0) <= len(pool):
            assert max(counts) <= 1
        else:
            assert max(counts) - min(counts) <= 1


def test_apportion_is_exact():
    assert apportion(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    assert apportion(7, np.array([0.0, 2.0])).tolist() == [0, 7]
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(4)
        n = int(rng.integers(0, 1000))
        out = apportion(n, w)
        assert out.sum() == n and (np.abs(out - n * w / w.sum()) < 1).all()


@given(w=st.integers(1, 4), epoch_size=st.integers(1, 60), budget=st.booleans(), grouped=st.booleans(),
       seed=st.integers(0, 2))
@settings(max_examples=25)
def test_ranks_together_serve_the_single_rank_epoch(sources, w, epoch_size, budget, grouped, seed):
    """The union of every rank's pairs is the single-rank epoch's multiset; equal batch counts."""
    kw = dict(max_tokens=200, max_length=40) if budget else dict(batch_size=3)
    # batch_size: an epoch of a multiple of the world size needs no DistributedSampler padding
    size = epoch_size * w
    single = Counter(_drawn(Loader(sources, weights=[1, 2, 3], epoch_size=size, seed=seed,
                                   group_by_length=grouped, **kw)))
    union: Counter = Counter()
    lens = set()
    for r in range(w):
        ld = Loader(sources, weights=[1, 2, 3], epoch_size=size, seed=seed, group_by_length=grouped, rank=r,
                    world_size=w, **kw)
        union += Counter(_drawn(ld))
        lens.add(len(ld))
    assert len(lens) == 1
    if budget and sum(union.values()) != size:  # fewer batches than ranks: batches repeated
        assert not (single - union) and set(union) <= set(single)
    else:
        assert union == single


@given(cut=st.integers(0, 12), layout=st.sampled_from(["padded", "packed", "prefix_shared"]),
       budget=st.booleans(), epoch=st.integers(0, 1))
@settings(max_examples=20)
def test_resume_equals_uninterrupted(sources, cut, layout, budget, epoch):
    kw = dict(weights={"a": 1, "b": 1, "c": 2}, epoch_size=90, seed=3, layout=layout)
    kw.update(dict(max_tokens=300) if budget or layout != "padded" else dict(batch_size=5))
    full = Loader(sources, **kw)
    full.set_epoch(epoch)
    everything = list(full)
    first = Loader(sources, **kw)
    first.set_epoch(epoch)
    head = list(islice(iter(first), cut))
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 4096
    again = Loader(sources, **kw)
    again.load_state_dict(state)
    rest = list(again)
    assert len(head) + len(rest) == len(everything)
    for x, y in zip(head + rest, everything):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.source, y.source)
        assert torch.equal(x.prompt_lengths, y.prompt_lengths)


@given(w0=st.integers(1, 3), w1=st.integers(1, 3), cut=st.integers(0, 4))
@settings(max_examples=15)
def test_elastic_resume_serves_the_epoch_multiset(sources, w0, w1, cut):
    """A job of w0 ranks served `cut` batches each; one of w1 ranks finishes from its state: together
    they serve every draw of the epoch (pairs drawn twice twice), nothing missing."""
    kw = dict(weights=[3, 1, 1], epoch_size=100, max_tokens=250, seed=1)
    epoch = Counter(_drawn(Loader(sources, **kw)))
    served: Counter = Counter()
    state = None
    for r in range(w0):
        ld = Loader(sources, rank=r, world_size=w0, **kw)
        served += Counter(_pairs(ld, cut))
        state = ld.state_dict()
    for r in range(w1):
        ld = Loader(sources, rank=r, world_size=w1, **kw)
        ld.load_state_dict(state)
        served += Counter(_pairs(ld))
    assert not (epoch - served)  # nothing missing
    assert set(served) <= set(epoch)  # extra copies only where a short plan repeats batches


def test_remove_served_is_a_multiset_difference():
    order = np.array([5, 1, 5, 2, 5, 1], dtype=np.int64)
    assert remove_served(order, np.array([5, 1, 9])).tolist() == [5, 2, 5, 1]
    u = np.random.default_rng(0).permutation(50)
    served = u[:17]
    assert remove_served(u, served).tolist() == u[~np.isin(u, served)].tolist()


def test_deterministic_and_seeded(sources):
    kw = dict(weights={"a": 1, "b": 2, "c": 1}, epoch_size=80, batch_size=8)
    a, b = _drawn(Loader(sources, seed=5, **kw)), _drawn(Loader(sources, seed=5, **kw))
    assert a == b
    assert a != _drawn(Loader(sources, seed=6, **kw))
    e1 = Loader(sources, seed=5, **kw)
    e1.set_epoch(1)
    assert _drawn(e1) != a
    # shuffle=False: each source in dataset order, interleaved evenly
    plain = _drawn(Loader(sources, shuffle=False, **kw))
    assert [i for s, i in plain if s == 0] == list(range(20))
    assert Counter(s for s, _ in plain[:8]) == Counter({1: 4, 0: 2, 2: 2})


def _expected(src: pairpack.Dataset, i: int) -> tuple[list[int], list[int], list[int]]:
    p, c, r = src[i]
    return p.tolist(), c.tolist(), r.tolist()


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_every_layout_carries_each_sources_tokens(sources, layout):
    names = list(sources)
    kw = dict(batch_size=6) if layout == "padded" else dict(max_tokens=400, max_row_tokens=150)
    ld = Loader(sources, weights=[1, 1, 1], epoch_size=60, layout=layout, **kw)
    seen = 0
    for b in ld:
        assert b.source.shape == b.indices.shape
        for k, (s, i) in enumerate(zip(b.source.tolist(), b.indices.tolist())):
            p, c, r = _expected(sources[names[s]], i)
            assert int(b.prompt_lengths[k]) == len(p)
            if layout == "padded":
                assert b.preferred_seq[k, :len(p) + len(c)].tolist() == p + c
                assert b.unpreferred_seq[k, :len(p) + len(r)].tolist() == p + r
            seen += 1
        if layout != "padded":
            flat = b.input_ids[b.attention_mask].tolist()
            cu = b.cu_seqlens.tolist()
            for q in range(len(cu) - 1):
                s, i = int(b.source[b.sequence_pair[q]]), int(b.indices[b.sequence_pair[q]])
                p, c, r = _expected(sources[names[s]], i)
                want = p + c + r if layout == "prefix_shared" else (p + c if int(b.sequence_side[q]) == 0 else p + r)
                assert flat[cu[q]:cu[q + 1]] == want
    assert seen == 60


def test_workers_give_the_same_batches(sources):
    kw = dict(weights=[1, 1, 1], epoch_size=40, batch_size=8, seed=2)
    assert _pairs(Loader(sources, num_workers=1, **kw)) == _pairs(Loader(sources, **kw))


def test_columns_and_names(sources, tmp_path):
    ld = Loader(sources, batch_size=4)
    assert ld.names == ("a", "b", "c")
    assert ld.source_counts() == SIZES  # default: each source's size, every pair once
    assert sorted(_drawn(ld)) == sorted((s, i) for s, n in enumerate(SIZES.values()) for i in range(n))
    assert Loader(pairpack.open(sources["a"].path), batch_size=4).names == ()


def test_mixed_tokenizers_are_refused(sources, tmp_path):
    other = _write(tmp_path / "o", 5, 9, vocab_size=400)
    with pytest.raises(PairpackError, match=r"a \(.*vocab_size 300.*o \(.*vocab_size 400"):
        Loader({"a": sources["a"], "o": other}, batch_size=2)
    pad = _write(tmp_path / "p", 5, 9, pad_id=7)
    with pytest.raises(ArgumentError, match="pad_id 7"):
        Loader({"a": sources["a"], "p": pad}, batch_size=2)
    tok = _write(tmp_path / "t", 5, 9, tokenizer={"kind": "test", "name": "other-tok", "vocab_size": 300})
    with pytest.raises(ArgumentError, match="tokenizer other-tok"):
        Loader({"a": sources["a"], "t": tok}, batch_size=2)


def test_state_of_another_mixture_is_refused(sources):
    base = dict(weights={"a": 1, "b": 1, "c": 1}, epoch_size=50, batch_size=4)
    ld = Loader(sources, **base)
    next(iter(ld))
    state = ld.state_dict()
    for change in (dict(epoch_size=51), dict(weights={"a": 2, "b": 1, "c": 1})):
        with pytest.raises(StateError, match="another mixture"):
            Loader(sources, **{**base, **change}).load_state_dict(state)
    with pytest.raises(StateError, match="another mixture"):
        Loader({"a": sources["a"], "b": sources["b"]}, weights=[1, 1], epoch_size=50,
               batch_size=4).load_state_dict(state)
    with pytest.raises(StateError):
        Loader(sources["a"], batch_size=4).load_state_dict(state)
    with pytest.raises(StateError, match="another mixture"):
        Loader(sources, **base).load_state_dict(Loader(sources["a"], batch_size=4).state_dict())
    # the same mixture whose source changed content: the fingerprint tells
    swapped = {"a": sources["b"], "b": sources["a"], "c": sources["c"]}
    with pytest.raises(StateError, match="fingerprint"):
        Loader(swapped, **base).load_state_dict(state)


def test_bad_mixture_arguments(sources):
    with pytest.raises(ArgumentError, match="every source"):
        Loader(sources, weights={"a": 1}, batch_size=2)
    with pytest.raises(ArgumentError, match="positive sum"):
        Loader(sources, weights=[0, 0, 0], batch_size=2)
    with pytest.raises(ArgumentError, match="epoch_size"):
        Loader(sources, epoch_size=0, batch_size=2)
    with pytest.raises(ArgumentError, match="mixture"):
        Loader(sources["a"], weights=[1], batch_size=2)
    with pytest.raises(ArgumentError, match="no pair taking part"):
        Loader(sources, indices={"c": []}, weights=[1, 1, 1], batch_size=2).batches()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_device_feeder_serves_a_mixture(sources, layout):
    """device="cuda": the same pairs, sources and local indices as the CPU path, on the device."""
    kw = dict(weights=[1, 2, 1], epoch_size=50, seed=4, layout=layout)
    kw.update(dict(batch_size=6) if layout == "padded" else dict(max_tokens=400))
    cpu = list(Loader(sources, **kw))
    dev = list(Loader(sources, device="cuda", **kw))
    assert len(cpu) == len(dev)
    for x, y in zip(cpu, dev):
        assert y.source.device.type == "cuda" and y.indices.device.type == "cuda"
        assert torch.equal(x.source, y.source.cpu()) and torch.equal(x.indices, y.indices.cpu())
        assert torch.equal(x.prompt_lengths, y.prompt_lengths.cpu())


@given(n=st.integers(0, 400), window=st.integers(1, 60), top=st.integers(1, 5000), descending=st.booleans(),
       seed=st.integers(0, 9))
@settings(max_examples=40)
def test_window_sort_is_the_two_key_sort(n, window, top, descending, seed):
    """The grouped planner's in-place window sort gives the order of lexsort((signed key, window))."""
    from pairpack.batch.plan import _group

    rng = np.random.default_rng(seed)
    seq = rng.permutation(n).astype(np.int64)
    key = rng.integers(0, top, n).astype(np.int64)
    wid = np.arange(n) // window
    signed = -key if descending else np.where(wid % 2 == 1, -key, key)
    assert _group(seq, key.copy(), window, descending).tolist() == seq[np.lexsort((signed, wid))].tolist()


def test_chunked_gather_plans_the_same(sources, monkeypatch):
    """Per-pair lengths gathered in chunks give the plan of the whole gather (grouped, budget, packed)."""
    import pairpack.batch.plan as plan

    kws = [dict(batch_size=4, group_by_length=True, window=16),
           dict(max_tokens=300, group_by_length=True, window=20),
           dict(max_tokens=400, layout="packed", max_row_tokens=120, group_by_length=True, window=20)]
    whole = [_drawn(Loader(sources, weights=[1, 1, 1], epoch_size=90, **kw)) for kw in kws]
    monkeypatch.setattr(plan, "_GATHER_CHUNK", 7)
    assert [_drawn(Loader(sources, weights=[1, 1, 1], epoch_size=90, **kw)) for kw in kws] == whole


def test_training_on_a_mixture(sources):
    """The docs/mixing.md loop: DPO steps on a weighted mixture, resumed from a saved state."""
    from pairpack.dpo import DPO
    from pairpack.train.tinylm import TinyLM

    torch.manual_seed(0)
    policy = TinyLM(300, max_len=64, d_model=16, n_layers=1, n_heads=2)
    dpo = DPO(policy, beta=0.1)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    kw = dict(weights={"a": 1, "b": 3, "c": 1}, epoch_size=40, max_tokens=800, max_length=48, seed=0)
    loader = Loader(sources, **kw)
    seen: Counter = Counter()
    state = None
    for step, batch in enumerate(loader):
        loss = dpo(**batch.as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        seen.update(loader.names[s] for s in batch.source.tolist())
        if step == 1:
            state = loader.state_dict()
    assert seen == Counter(loader.source_counts()) == Counter({"a": 8, "b": 24, "c": 8})
    resumed = Loader(sources, **kw)
    resumed.load_state_dict(state)
    assert sum(len(b) for b in resumed) == 40 - sum(len(b) for b in islice(iter(Loader(sources, **kw)), 2))


def test_stats_of_a_mixture_cli(sources, tmp_path):
    from .conftest import run_cli

    r = run_cli("stats", sources["a"].path, "--with", sources["b"].path, "--with", sources["c"].path, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["num_pairs"] == sum(SIZES.values()) and got["path"] == "mixture(a, b, c)"
    one = json.loads(run_cli("stats", sources["a"].path, "--json").stdout)
    assert got["lengths"]["prompt"]["max"] >= one["lengths"]["prompt"]["max"]
    other = _write(tmp_path / "v", 3, 1, vocab_size=500)
    r = run_cli("stats", sources["a"].path, "--with", other.path)
    assert r.returncode == 1 and "cannot be served together" in r.stderr
    assert "--with data/uf" in run_cli("stats", "--help").stdout
