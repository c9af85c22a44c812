"""Epoch order, rank slicing and batch planning on length arrays (no dataset needed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pairpack.batch.plan import (
    check_options,
    padding_ceiling,
    padding_efficiency,
    plan_batches,
    row_lengths,
    truncate_lengths,
)
from pairpack.errors import PairpackError
from pairpack.batch.sampling import epoch_order, equalize, resolve_rank

FP = "0123456789abcdef0123456789abcdef"


def _lengths(draw, n: int, hi: int) -> np.ndarray:
    return np.array(draw(st.lists(st.tuples(*[st.integers(1, hi)] * 3), min_size=n, max_size=n)),
                    dtype=np.int64).reshape(n, 3).T.copy()


@st.composite
def plans(draw):
    n = draw(st.integers(0, 60))
    lengths = _lengths(draw, n, draw(st.sampled_from([3, 40, 300])))
    opts = dict(
        world_size=draw(st.integers(1, 8)),
        drop_last=draw(st.booleans()),
        group_by_length=draw(st.booleans()),
        window=draw(st.sampled_from([None, 1, 7, 64])),
        max_length=draw(st.sampled_from([None, 2, 5, 50])),
        pad_to_multiple_of=draw(st.sampled_from([None, 1, 8])),
    )
    if draw(st.booleans()):
        opts["batch_size"] = draw(st.integers(1, 9))
    else:
        opts["max_tokens"] = draw(st.sampled_from([16, 100, 1000, 5000]))
    seed, epoch = draw(st.integers(0, 2**32)), draw(st.integers(0, 5))
    return lengths, opts, seed, epoch


# --- order -----------------------------------------------------------------------------------------
@given(st.integers(0, 300), st.integers(0, 2**40), st.integers(0, 100))
def test_epoch_order_is_a_pure_permutation(n, seed, epoch):
    a = epoch_order(n, seed=seed, epoch=epoch, fingerprint=FP)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(n))
    assert np.array_equal(a, epoch_order(n, seed=seed, epoch=epoch, fingerprint=FP))
    assert np.array_equal(epoch_order(n, seed=seed, epoch=epoch, fingerprint=FP, shuffle=False), np.arange(n))


def test_epoch_order_depends_on_seed_epoch_and_fingerprint():
    base = epoch_order(1000, seed=1, epoch=0, fingerprint=FP)
    assert not np.array_equal(base, epoch_order(1000, seed=2, epoch=0, fingerprint=FP))
    assert not np.array_equal(base, epoch_order(1000, seed=1, epoch=1, fingerprint=FP))
    assert not np.array_equal(base, epoch_order(1000, seed=1, epoch=0, fingerprint="f" + FP[1:]))
    sub = np.array([3, 5, 9, 11], dtype=np.int64)
    assert sorted(epoch_order(1000, seed=1, epoch=0, fingerprint=FP, subset=sub).tolist()) == sub.tolist()
    with pytest.raises(ValueError):
        epoch_order(10, seed=-1, epoch=0, fingerprint=FP)


@given(st.integers(0, 40), st.integers(1, 9), st.booleans())
def test_equalize_matches_distributed_sampler(n, world, drop_last):
    from torch.utils.data.distributed import DistributedSampler

    seq = equalize(np.arange(n), world, drop_last)
    for r in range(world):
        ref = list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last))
        assert seq[r::world].tolist() == ref


def test_resolve_rank_defaults_and_errors():
    assert resolve_rank(None, None) == (0, 1)
    assert resolve_rank(2, 4) == (2, 4)
    for bad in ((None, 2), (2, None), (4, 4), (-1, 2)):
        with pytest.raises(ValueError):
            resolve_rank(*bad)


# --- truncation arithmetic ---------------------------------------------------------------------------
@given(st.lists(st.tuples(*[st.integers(1, 500)] * 3), min_size=1, max_size=50), st.integers(2, 600),
       st.integers(1, 8))
@example([(10, 1, 1)], 2, 1)
@example([(1, 500, 3)], 3, 2)
def test_truncation_keeps_prompt_and_completions(rows, max_length, k):
    k = min(k, max_length - 1)
    ln = np.array(rows, dtype=np.int64).T
    p, c, r = truncate_lengths(ln, max_length, k)
    assert (p >= 1).all() and (c >= 1).all() and (r >= 1).all()
    assert (p + np.maximum(c, r) <= max_length).all()
    assert (p <= ln[0]).all() and (c <= ln[1]).all() and (r <= ln[2]).all()
    fits = ln[0] + np.maximum(ln[1], ln[2]) <= max_length
    assert np.array_equal(np.stack([p, c, r])[:, fits], ln[:, fits])
    # completions are cut first: the prompt loses tokens only when both are at their floor
    cut_prompt = p < ln[0]
    assert (c[cut_prompt] == np.minimum(ln[1], k)[cut_prompt]).all()
    assert (r[cut_prompt] == np.minimum(ln[2], k)[cut_prompt]).all()
    assert np.array_equal(row_lengths(ln, max_length, k), p + np.maximum(c, r))


def test_option_errors():
    with pytest.raises(ValueError, match="exactly one"):
        check_options(batch_size=None, max_tokens=None, max_length=None)
    with pytest.raises(ValueError, match="exactly one"):
        check_options(batch_size=2, max_tokens=100, max_length=None)
    with pytest.raises(ValueError, match="truncation"):
        check_options(batch_size=2, max_tokens=None, max_length=None, truncation="middle")
    with pytest.raises(ValueError, match="max_length"):
        check_options(batch_size=2, max_tokens=None, max_length=1)
    with pytest.raises(ValueError, match="max_tokens"):
        check_options(batch_size=None, max_tokens=3, max_length=None)


# --- plans -----------------------------------------------------------------------------------------
def _all_ranks(lengths, order, opts, seed):
    return [plan_batches(lengths, order, seed=seed, rank=r, **opts) for r in range(opts["world_size"])]


@given(plans())
@example((np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 2, 1, 1]]), {"world_size": 6, "drop_last": False,
          "group_by_length": True, "window": None, "max_length": None, "pad_to_multiple_of": None,
          "max_tokens": 16}, 42, 0))
@example((np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]]), {"world_size": 2, "drop_last": False,
          "group_by_length": False, "window": None, "max_length": None, "pad_to_multiple_of": None,
          "max_tokens": 16}, 0, 0))
@settings(max_examples=150)
def test_plan_ranks_disjoint_cover_epoch_and_respect_budget(case):
    lengths, opts, seed, epoch = case
    n = lengths.shape[1]
    world = opts["world_size"]
    order = epoch_order(n, seed=seed, epoch=epoch, fingerprint=FP)
    ranks = _all_ranks(lengths, order, opts, seed)
    assert len({len(b) for b in ranks}) == 1, "every rank must get the same number of batches"
    got = np.concatenate([x for b in ranks for x in b] + [np.zeros(0, np.int64)])
    eff = opts["max_length"]
    if "max_tokens" in opts:
        eff = min(eff or 1 << 60, opts["max_tokens"] // 2 // (opts["pad_to_multiple_of"] or 1)
                  * (opts["pad_to_multiple_of"] or 1))
    row = row_lengths(lengths, eff)
    m = opts["pad_to_multiple_of"] or 1
    for b in (x for r in ranks for x in r):
        assert len(b) >= 1
        if "batch_size" in opts:
            assert len(b) <= opts["batch_size"]
        else:
            assert 2 * len(b) * (-(-int(row[b].max()) // m) * m) <= opts["max_tokens"]
    if "batch_size" in opts:
        bsz = opts["batch_size"]
        # DistributedSampler on pairs, then batches of B per rank
        per_rank = n // world if opts["drop_last"] else -(-n // world)
        expect = per_rank // bsz * bsz if opts["drop_last"] else per_rank
        assert all(sum(map(len, b)) == expect for b in ranks)
        assert all(len(x) == bsz for b in ranks for x in b[:-1])
    if opts["drop_last"] or len(got) <= n:
        assert len(set(got.tolist())) == len(got), "ranks overlap"
    if not opts["drop_last"]:
        assert set(got.tolist()) == set(range(n)), "the union of the ranks is not the epoch"
        if len(got) > n and "batch_size" in opts:  # repeats as DistributedSampler pads: the order's first pairs
            extra = len(got) - n
            assert sorted(got.tolist()) == sorted(order.tolist() + np.resize(order, extra).tolist())
        elif len(got) > n:  # a budget repeats only when even one-pair batches are too few for the ranks
            assert len(got) == -(-n // world) * world and n % world
    assert set(got.tolist()) <= set(range(n))
    again = _all_ranks(lengths, order, opts, seed)
    assert all(np.array_equal(x, y) for a, b in zip(ranks, again) for x, y in zip(a, b))


@given(st.integers(1, 200), st.integers(1, 8), st.integers(1, 8), st.sampled_from([64, 1000, 10**6]))
def test_token_budget_needs_no_repeat_when_pairs_suffice(n, world, hi, budget):
    rng = np.random.default_rng(n * 31 + world)
    lengths = rng.integers(1, hi + 1, size=(3, n)).astype(np.int64)
    order = rng.permutation(n).astype(np.int64)
    ranks = [plan_batches(lengths, order, max_tokens=budget, rank=r, world_size=world, drop_last=True)
             for r in range(world)]
    got = [i for b in ranks for x in b for i in x.tolist()]
    assert len(got) == len(set(got))
    if n >= world and budget >= 2 * n * 2 * hi:  # a single batch could hold everything: splitting suffices
        assert sorted(got) == list(range(n))


def _lognormal(n: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    med = (180, 220, 220)
    return np.stack([np.maximum(1, rng.lognormal(np.log(m), sigma, n)).astype(np.int64) for m in med])


@pytest.mark.parametrize("sigma", [0.5, 1.0])
@pytest.mark.parametrize("size", [{"batch_size": 32}, {"max_tokens": 32768}])
def test_grouping_reaches_95_percent_of_the_ceiling(sigma, size):
    lengths = _lognormal(40_000, sigma)
    order = epoch_order(lengths.shape[1], seed=0, epoch=0, fingerprint=FP)
    ceiling = padding_ceiling(lengths)
    budget = {"max_tokens": size.get("max_tokens")}
    grouped = padding_efficiency(lengths, plan_batches(lengths, order, group_by_length=True, **size), **budget)
    assert grouped >= 0.95 * ceiling
    rand = padding_efficiency(lengths, plan_batches(lengths, order, **size), **budget)
    assert rand < grouped
    if "batch_size" in size and sigma >= 1.0:  # the observation: random batches of 32 waste over half
        assert rand < 0.5 * ceiling
    # grouped batches are a permutation of the same pairs, in an order that differs per epoch
    g0 = plan_batches(lengths, order, group_by_length=True, seed=[0, 0], **size)
    g1 = plan_batches(lengths, order, group_by_length=True, seed=[0, 1], **size)
    assert sorted(np.concatenate(g0).tolist()) == list(range(lengths.shape[1]))
    assert [len(b) for b in g0] != [len(b) for b in g1] or not all(np.array_equal(a, b) for a, b in zip(g0, g1))


def test_padding_efficiency_counts_both_rows_and_pad_multiple():
    lengths = np.array([[2, 1], [3, 1], [1, 1]], dtype=np.int64)  # pairs (P,C,R) = (2,3,1), (1,1,1)
    # one batch: L = 5; real = (2*2+3+1) + (2+1+1) = 12; padded = 2 * 2 * 5 = 20
    assert padding_efficiency(lengths, [np.array([0, 1])]) == pytest.approx(12 / 20)
    assert padding_efficiency(lengths, [np.array([0, 1])], pad_to_multiple_of=8) == pytest.approx(12 / 32)
    assert padding_ceiling(lengths) == pytest.approx(12 / (2 * 5 + 2 * 2))
    assert padding_efficiency(lengths, []) == 1.0


def test_oversize_modes():
    lengths = np.array([[4, 40, 1], [1, 1, 1], [1, 1, 1]], dtype=np.int64)  # pair 1 has row length 41
    order = np.arange(3, dtype=np.int64)
    with pytest.raises(PairpackError, match="exceed max_tokens"):
        plan_batches(lengths, order, max_tokens=40, oversize="error")
    skipped = plan_batches(lengths, order, max_tokens=40, oversize="skip")
    assert sorted(np.concatenate(skipped).tolist()) == [0, 2]
    cut = plan_batches(lengths, order, max_tokens=40)
    assert sorted(np.concatenate(cut).tolist()) == [0, 1, 2]
    assert padding_efficiency(lengths, cut, max_tokens=40) <= 1.0
