"""pairpack.Loader on small generated datasets: triplet invariants, truncation, ranks, resume,
workers, state validation and plain DataLoader use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.batch.plan import Collate, row_lengths
from pairpack.errors import PairpackError, StateError
from pairpack.batch.loader import Loader

PAD = 0


def _write(path, rows, **kw):
    with pairpack.Writer(path, vocab_size=kw.pop("vocab_size", 300), pad_id=PAD, **kw) as w:
        for p, c, r in rows:
            w.add(p, c, r)
    return pairpack.open(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """150 pairs, 3+ shards, prompts shared by runs of pairs, lengths 1..40, some chosen/rejected
    sharing long prefixes (so truncation makes them identical)."""
    rng = np.random.default_rng(7)
    rows = []
    prompt = None
    for i in range(150):
        if prompt is None or rng.random() < 0.6:
            prompt = rng.integers(1, 300, rng.integers(1, 40)).tolist()
        c = rng.integers(1, 300, rng.integers(1, 40)).tolist()
        if i % 7 == 0:  # rejected = chosen's first tokens + something else
            r = c[: max(1, len(c) // 2)] + rng.integers(1, 300, rng.integers(1, 10)).tolist()
        else:
            r = rng.integers(1, 300, rng.integers(1, 40)).tolist()
        rows.append((prompt, c, r))
    return _write(tmp_path_factory.mktemp("loader") / "ds", rows, shard_bytes=4000)


def _reference(ds, i, max_length, truncation, k=1):
    """Pair i after truncation, the slow obvious way (the oracle)."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in ds[int(i)])
    if max_length is not None and len(p) + max(len(c), len(r)) > max_length:
        cap = max(max_length - len(p), k)
        c, r = c[:cap], r[:cap]
        keep = max_length - max(len(c), len(r))
        if keep < len(p):
            p = p[len(p) - keep:] if truncation == "keep_end" else p[:keep]
    return p, c, r


def check_batch(ds, b, *, max_length=None, truncation="keep_end", max_tokens=None, mult=None):
    """The triplet invariants of one batch against the oracle."""
    B, L = b.shape
    assert b.preferred_seq.dtype == b.unpreferred_seq.dtype == torch.int64
    for m in (b.prompt_mask, b.preferred_seq_mask, b.unpreferred_seq_mask):
        assert m.dtype == torch.bool and m.shape == (B, L)
    if mult:
        assert L % mult == 0
    if max_tokens is not None:
        assert 2 * B * L <= max_tokens
    assert not (b.prompt_mask & ~b.preferred_seq_mask).any()
    assert not (b.prompt_mask & ~b.unpreferred_seq_mask).any()
    longest = 0
    for row, i in enumerate(b.indices.tolist()):
        p, c, r = _reference(ds, i, max_length, truncation)
        longest = max(longest, len(p) + len(c), len(p) + len(r))
        P = len(p)
        assert P >= 1 and len(c) >= 1 and len(r) >= 1
        assert b.prompt_lengths[row] == P and b.chosen_lengths[row] == len(c) and b.rejected_lengths[row] == len(r)
        for seq, mask, comp in ((b.preferred_seq, b.preferred_seq_mask, c), (b.unpreferred_seq, b.unpreferred_seq_mask, r)):
            n = P + len(comp)
            assert seq[row, :P].tolist() == p.tolist()  # the same prompt in both rows
            assert seq[row, P:n].tolist() == comp.tolist()
            assert (seq[row, n:] == PAD).all()
            assert mask[row, :n].all() and not mask[row, n:].any()
        assert b.prompt_mask[row, :P].all() and not b.prompt_mask[row, P:].any()
        if max_length is not None:
            assert P + max(len(c), len(r)) <= max_length
    if not mult:
        assert L == longest


@st.composite
def loader_options(draw):
    opts = dict(
        seed=draw(st.integers(0, 2**31)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        group_by_length=draw(st.booleans()),
        world_size=draw(st.integers(1, 8)),
        max_length=draw(st.sampled_from([None, 2, 9, 30])),
        truncation=draw(st.sampled_from(["keep_end", "keep_start"])),
        pad_to_multiple_of=draw(st.sampled_from([None, 8])),
    )
    if draw(st.booleans()):
        opts["batch_size"] = draw(st.integers(1, 12))
    else:
        opts["max_tokens"] = draw(st.sampled_from([64, 300, 2000]))
    return opts, draw(st.integers(0, 3))


@given(loader_options())
@example(({"seed": 0, "shuffle": True, "drop_last": False, "group_by_length": True, "world_size": 3,
           "max_length": 2, "truncation": "keep_end", "pad_to_multiple_of": None, "max_tokens": 64}, 0))
@settings(max_examples=25)
def test_ranks_partition_the_epoch_and_batches_are_exact(ds, case):
    opts, epoch = case
    world = opts.pop("world_size")
    loaders = [Loader(ds, rank=r, world_size=world, **opts) for r in range(world)]
    for ld in loaders:
        ld.set_epoch(epoch)
    per_rank = [list(ld) for ld in loaders]
    assert len({len(b) for b in per_rank}) == 1 and all(len(ld) == len(b) for ld, b in zip(loaders, per_rank))
    seen = [i for bs in per_rank for b in bs for i in b.indices.tolist()]
    used = set(range(len(ds))) - _excluded(ds, loaders[0])
    if opts["drop_last"] or len(seen) <= len(used):
        assert len(seen) == len(set(seen)), "ranks overlap"
    if not opts["drop_last"]:
        assert set(seen) == used
    assert set(seen) <= used
    eff = loaders[0].effective_max_length
    for bs in per_rank[:2]:
        for b in bs:
            check_batch(ds, b, max_length=eff, truncation=opts["truncation"], max_tokens=opts.get("max_tokens"),
                        mult=opts["pad_to_multiple_of"])


def _excluded(ds, ld):
    """Pairs the loader leaves out: chosen == rejected after truncation (checked with the oracle)."""
    out = set()
    for i in range(len(ds)):
        _, c, r = _reference(ds, i, ld.effective_max_length, ld.truncation)
        orig = ds[i]
        if np.array_equal(c, r) and not np.array_equal(orig.chosen, orig.rejected):
            out.add(i)
    return out


def test_truncation_drops_pairs_made_identical_and_counts(ds):
    ld = Loader(ds, batch_size=16, max_length=4)
    c = ld.counts
    assert c["dropped_identical"] == len(_excluded(ds, ld)) > 0
    assert c["used"] == len(ds) - c["dropped_identical"]
    excluded = np.zeros(len(ds), dtype=bool)
    excluded[list(_excluded(ds, ld))] = True
    assert c["truncated"] == int(((row_lengths(ds.lengths) > 4) & ~excluded).sum()) > 0
    seen = {i for b in ld for i in b.indices.tolist()}
    assert seen == set(range(len(ds))) - _excluded(ds, ld)
    plain = Loader(ds, batch_size=16)
    assert plain.counts == {"pairs": len(ds), "used": len(ds), "truncated": 0, "dropped_identical": 0,
                            "skipped_oversize": 0}


def test_oversize_pairs_truncated_skipped_or_reported(ds):
    longest = int(row_lengths(ds.lengths).max())
    budget = 2 * (longest - 5)
    cut = Loader(ds, max_tokens=budget)
    assert cut.effective_max_length == longest - 5 and cut.counts["truncated"] > 0
    for b in cut:
        check_batch(ds, b, max_length=longest - 5, max_tokens=budget)
    skip = Loader(ds, max_tokens=budget, oversize="skip")
    n_over = int((row_lengths(ds.lengths) > longest - 5).sum())
    assert skip.counts["skipped_oversize"] == n_over and skip.counts["used"] == len(ds) - n_over
    with pytest.raises(PairpackError, match="exceed max_tokens"):
        len(Loader(ds, max_tokens=budget, oversize="error"))


def test_order_is_a_function_of_seed_and_epoch(ds):
    a = Loader(ds, batch_size=10, seed=3)
    first = [b.indices.tolist() for b in a]
    assert [b.indices.tolist() for b in a] == first  # iterating again repeats the epoch
    assert [b.indices.tolist() for b in Loader(ds, batch_size=10, seed=3)] == first
    a.set_epoch(1)
    assert [b.indices.tolist() for b in a] != first
    assert [b.indices.tolist() for b in Loader(ds, batch_size=10, seed=4)] != first
    ordered = [i for b in Loader(ds, batch_size=10, shuffle=False) for i in b.indices.tolist()]
    assert ordered == list(range(len(ds)))


def _run(ld):
    return [(b.indices.tolist(), b.preferred_seq.tolist(), b.unpreferred_seq_mask.sum().item()) for b in ld]


@given(st.integers(0, 30), st.booleans(), st.integers(0, 2))
@settings(max_examples=20)
def test_resume_at_any_cut_equals_the_uninterrupted_run(ds, cut, grouped, epoch):
    kw = dict(max_tokens=400, group_by_length=grouped, seed=5, max_length=25, world_size=2, rank=1)
    full_ld = Loader(ds, **kw)
    full_ld.set_epoch(epoch)
    full = _run(full_ld)
    cut = min(cut, len(full))
    a = Loader(ds, **kw)
    a.set_epoch(epoch)
    it = iter(a)
    head = [next(it) for _ in range(cut)]
    state = a.state_dict()
    assert state["position"] == cut and state["epoch"] == epoch
    b = Loader(ds, **kw)
    b.load_state_dict(state)
    b.set_epoch(epoch)  # the usual training loop calls set_epoch again: the position is kept
    assert [x.indices.tolist() for x in head] + [x[0] for x in _run(b)] == [x[0] for x in full]


@pytest.mark.parametrize("cut", [0, 3, 11])
def test_resume_across_worker_counts(ds, cut):
    kw = dict(batch_size=6, group_by_length=True, seed=1, max_length=30)
    full = _run(Loader(ds, **kw))
    a = Loader(ds, num_workers=2, **kw)
    it = iter(a)
    head = [next(it) for _ in range(cut)]
    state = a.state_dict()
    del it
    b = Loader(ds, num_workers=0, **kw)
    b.load_state_dict(state)
    assert _run(a.__class__(ds, num_workers=2, **kw)) == full  # workers do not change the batches
    assert [(x.indices.tolist(), x.preferred_seq.tolist(), x.unpreferred_seq_mask.sum().item()) for x in head] \
        + _run(b) == full
    c = Loader(ds, num_workers=2, **kw)
    c.load_state_dict(state)
    assert _run(c) == full[cut:]


def test_state_is_small_and_validated(ds, tmp_path):
    import json

    ld = Loader(ds, batch_size=8, seed=2, max_length=20)
    state = ld.state_dict()
    assert len(json.dumps(state)) < 1000
    # one rank's state resumes another rank (all ranks are at the same position)
    Loader(ds, batch_size=8, seed=2, max_length=20, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(StateError, match="options differ.*batch_size"):
        Loader(ds, batch_size=9, seed=2, max_length=20).load_state_dict(state)
    with pytest.raises(StateError, match="seed"):
        Loader(ds, batch_size=8, seed=3, max_length=20).load_state_dict(state)
    # another world size is an elastic resume (test_elastic_resume_*), not an error
    Loader(ds, batch_size=8, seed=2, max_length=20, rank=0, world_size=2).load_state_dict(state)
    for bad in ([[0, 1]], [[2]], "x", [[2, -1]], [[2.0, 1]]):
        with pytest.raises(StateError, match="elastic"):
            ld.load_state_dict({**state, "elastic": bad})
    other = _write(tmp_path / "other", [([1, 2], [3], [4])])
    with pytest.raises(StateError, match="fingerprint"):
        Loader(other, batch_size=8, seed=2, max_length=20).load_state_dict(state)
    with pytest.raises(StateError):
        ld.load_state_dict({"epoch": 0})
    with pytest.raises(StateError, match="position"):
        ld.load_state_dict({**state, "position": 10**6})
    # a restored position is dropped when another epoch is selected
    ld.load_state_dict({**state, "position": 3})
    ld.set_epoch(1)
    assert len(list(ld)) == len(ld)


def test_bad_options_raise(ds):
    with pytest.raises(ValueError):
        Loader(ds)
    with pytest.raises(ValueError):
        Loader(ds, batch_size=4, max_length=1)
    with pytest.raises(ValueError):
        Loader(ds, batch_size=4, rank=2, world_size=2)
    with pytest.raises(KeyError):
        Loader(ds, batch_size=4, columns=["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(ds):
    with pytest.raises(PairpackError, match="CUDA is not available"):
        Loader(ds, batch_size=4, device="cuda")
    assert len(next(iter(Loader(ds, batch_size=4, device="cpu")))) == 4


def test_columns_and_path_argument(tmp_path):
    with pairpack.Writer(tmp_path / "c", vocab_size=50, columns={"score": "float32"}) as w:
        for i in range(20):
            w.add([1 + i % 5], [2, 3], [4], score=float(i))
    ld = Loader(tmp_path / "c", batch_size=6, columns=["score"])
    for b in ld:
        assert b.columns["score"].tolist() == [float(i) for i in b.indices.tolist()]


# --- plain torch DataLoader ------------------------------------------------------------------------
def test_plain_dataloader_with_collate(ds):
    from torch.utils.data import DataLoader

    dl = DataLoader(range(len(ds)), batch_size=8, shuffle=False, collate_fn=Collate(ds, max_length=12))
    for b in dl:
        check_batch(ds, b, max_length=12)
    # a list of Pair views (DataLoader over the Dataset itself) gives the same tensors
    by_index = next(iter(DataLoader(range(len(ds)), batch_size=8, collate_fn=Collate(ds, max_length=12,
                                                                                      truncation="keep_start"))))
    by_pair = next(iter(DataLoader(ds, batch_size=8, collate_fn=Collate(ds, max_length=12, truncation="keep_start"))))
    kept = by_index.indices.tolist()
    assert by_pair.preferred_seq.shape[0] == len(kept)
    assert torch.equal(by_pair.preferred_seq, by_index.preferred_seq)
    assert torch.equal(by_pair.unpreferred_seq_mask, by_index.unpreferred_seq_mask)
    assert (by_pair.indices == -1).all()


def test_plain_dataloader_with_batch_sampler_and_workers(ds):
    from torch.utils.data import DataLoader

    ld = Loader(ds, max_tokens=500, group_by_length=True, max_length=30, seed=9)
    dl = DataLoader(range(len(ds)), batch_sampler=ld.batch_sampler, collate_fn=ld.collate_fn(), num_workers=2)
    got = [b.indices.tolist() for b in dl]
    assert got == [b.indices.tolist() for b in ld]
    assert len(dl) == len(ld)


@pytest.mark.parametrize("transfer", [{}, {"compact": False}, {"compact": False, "host_widen": True}])
def test_device_loop_hands_plans_to_the_feeder_in_order(ds, monkeypatch, transfer):
    """The device path (plans submitted ahead, batches taken in order, resume) with the CUDA
    engineer's DeviceFeeder running on CPU: every line but the CUDA calls."""
    cuda = pytest.importorskip("pairpack.cuda")
    kw = dict(max_tokens=400, group_by_length=True, max_length=25, seed=4)
    ref = _run(Loader(ds, **kw))
    ld = Loader(ds, prefetch=3, **transfer, **kw)
    monkeypatch.setattr(ld, "_feeder_cls", cuda.DeviceFeeder)  # device=None -> the feeder's CPU mode
    assert _run(ld) == ref
    it = iter(ld)
    head = [next(it) for _ in range(4)]
    state = ld.state_dict()
    del it
    again = Loader(ds, **kw)
    monkeypatch.setattr(again, "_feeder_cls", cuda.DeviceFeeder)
    again.load_state_dict(state)
    assert [x.indices.tolist() for x in head] + [x[0] for x in _run(again)] == [x[0] for x in ref]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), world=st.integers(1, 4), bs=st.integers(1, 9), cut=st.integers(0, 50))
def test_split_indices_cover_exactly_the_split_and_resume(ds, data, world, bs, cut):
    """With ``indices`` (a split) the ranks see disjoint parts whose union is the split (repeats only
    to equalise ranks, as DistributedSampler does), and a resumed run continues exactly."""
    n = len(ds)
    split = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))), dtype=np.int64)
    per_rank = []
    for r in range(world):
        ld = Loader(ds, batch_size=bs, indices=split, rank=r, world_size=world, seed=3)
        per_rank.append(np.concatenate([b.indices.numpy() for b in ld]))
        assert ld.counts["pairs"] == len(split)
    seen = np.concatenate(per_rank)
    assert set(seen.tolist()) == set(split.tolist())
    assert len(seen) - len(split) < world  # only the DistributedSampler padding repeats
    full = [b.indices.tolist() for b in Loader(ds, batch_size=bs, indices=split, seed=3)]
    k = min(cut, len(full))
    first = Loader(ds, batch_size=bs, indices=split, seed=3)
    it = iter(first)
    head = [next(it).indices.tolist() for _ in range(k)]
    resumed = Loader(ds, batch_size=bs, indices=split, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + [b.indices.tolist() for b in resumed] == full


def test_split_indices_are_checked_and_bound_to_the_state(ds):
    with pytest.raises(ValueError, match="out of range"):
        Loader(ds, batch_size=4, indices=[0, len(ds)])
    with pytest.raises(ValueError, match="more than once"):
        Loader(ds, batch_size=4, indices=[3, 1, 3])
    state = Loader(ds, batch_size=4, indices=[0, 1, 2, 5]).state_dict()
    with pytest.raises(StateError, match="indices_digest"):
        Loader(ds, batch_size=4, indices=[0, 1, 2, 6]).load_state_dict(state)
    with pytest.raises(StateError, match="indices_digest"):
        Loader(ds, batch_size=4).load_state_dict(state)


# --- elastic resume: a state saved by a job of W ranks, loaded by a job of another size ------------
def _served(ld: Loader, upto: int | None = None) -> list[list[int]]:
    """Pair indices of the next ``upto`` batches (all when None); takes no batch beyond them."""
    from itertools import islice

    return [b.indices.tolist() for b in islice(iter(ld), upto)]


@given(w0=st.integers(1, 4), w1=st.integers(1, 4), w2=st.integers(1, 3), cut=st.integers(0, 6),
       cut2=st.integers(0, 4), budget=st.booleans(), grouped=st.booleans(), epoch=st.integers(0, 1))
@settings(max_examples=25)
@example(w0=2, w1=3, w2=1, cut=1, cut2=1, budget=False, grouped=True, epoch=0)
@example(w0=1, w1=2, w2=2, cut=0, cut2=1, budget=False, grouped=False, epoch=0)  # padding repeats within a plan
def test_elastic_resume_serves_each_pair_once(ds, w0, w1, w2, cut, cut2, budget, grouped, epoch):
    """Job A (w0 ranks) is served `cut` batches per rank and saves; job B (w1 ranks) loads that
    state, is served `cut2` batches and saves; job C (w2 ranks) finishes the epoch. Over A, B and
    C every pair of the epoch is served, none by two plans, and within each job every rank gets
    the same number of batches (collectives never hang)."""
    kw = dict(max_tokens=300, max_length=25) if budget else dict(batch_size=3, max_length=25)
    kw.update(group_by_length=grouped, seed=7)
    epoch_pairs = set()
    for r in range(w0):
        full = Loader(ds, rank=r, world_size=w0, **kw)
        full.set_epoch(epoch)
        epoch_pairs |= {i for b in _served(full) for i in b}
    state = None
    seen: list[set[int]] = []
    for w, upto in ((w0, cut), (w1, cut2), (w2, None)):
        job: set[int] = set()
        counts = set()
        states = []
        for r in range(w):
            ld = Loader(ds, rank=r, world_size=w, **kw)
            ld.set_epoch(epoch)
            if state is not None:
                ld.load_state_dict(state)
            got = _served(ld, upto)
            counts.add(len(got))
            job |= {i for b in got for i in b}
            states.append(ld.state_dict())
        assert len(counts) == 1, counts  # same number of batches on every rank
        assert all(st_["position"] == states[0]["position"] for st_ in states)
        seen.append(job)
        state = states[0]
    # a job of the same size as the one before it resumes that job's plan exactly (a plain resume),
    # where DistributedSampler padding may repeat a pair; across plans no pair is served twice
    plans: list[set[int]] = [seen[0]]
    for k, w in ((1, w1), (2, w2)):
        if w == (w0, w1, w2)[k - 1]:
            plans[-1] |= seen[k]
        else:
            plans.append(seen[k])
    for i in range(len(plans)):
        for j in range(i + 1, len(plans)):
            assert not (plans[i] & plans[j]), (i, j)
    assert set().union(*plans) == epoch_pairs  # and none lost


def test_elastic_resume_then_plain_resume_and_next_epoch(ds):
    kw = dict(batch_size=2, max_length=25, group_by_length=True, seed=3)
    a = Loader(ds, rank=0, world_size=2, **kw)
    _served(a, 2)
    state = a.state_dict()
    b = Loader(ds, rank=1, world_size=3, **kw)
    b.load_state_dict(state)
    assert b.state_dict()["elastic"] == [[2, 2]] and b.state_dict()["position"] == 0
    whole = _served(b)
    # a plain resume inside the elastic part continues it exactly
    c = Loader(ds, rank=1, world_size=3, **kw)
    c.load_state_dict(state)
    head = _served(c, 1)
    d = Loader(ds, rank=1, world_size=3, **kw)
    d.load_state_dict(c.state_dict())
    assert head + _served(d) == whole
    # the next epoch is an ordinary one of the new size
    d.set_epoch(1)
    fresh = Loader(ds, rank=1, world_size=3, **kw)
    fresh.set_epoch(1)
    assert d.state_dict()["elastic"] == [] and _served(d) == _served(fresh)
