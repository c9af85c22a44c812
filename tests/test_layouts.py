"""The packed and prefix_shared layouts (pairpack.batch.layouts): token content, positions, the
scoring map and the attention rule against brute force, and the Loader's guarantees per layout."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pairpack.batch.layouts import CHOSEN, REJECTED, PackedBatch, build
from pairpack.batch.loader import Loader
from pairpack.batch.options import OversizeError, PlanOptions, Truncation
from pairpack.batch.plan import BatchPlan, make_plan
from pairpack.batch.triplets import assemble
from pairpack.errors import DeviceError, PairpackError, StateError
from .test_loader import PAD, _reference, ds, loader_options  # noqa: F401  (ds: test_loader's module fixture)

LAYOUTS = ("packed", "prefix_shared")


# --- plan-level: random lengths, completions sharing long prefixes ---------------------------------
@st.composite
def plans(draw):
    """A BatchPlan over one token array: B pairs with P, C, R >= 1; rejected often shares a long
    prefix with chosen."""
    b = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    toks, ps, cs, ln = [], [], [], []
    off = 0
    for _ in range(b):
        p, c = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        shared = draw(st.integers(0, c))
        r = shared + draw(st.integers(1 if shared == c else 0, 6))
        r = max(r, 1)
        prompt, chosen = rng.integers(1, 50, p), rng.integers(1, 50, c)
        rejected = np.concatenate([chosen[:shared], rng.integers(1, 50, r - min(shared, r))])[:r]
        toks += [prompt, chosen, rejected]
        ps.append(off)
        cs.append((off + p, off + p + c))
        ln.append((p, c, len(rejected)))
        off += p + c + len(rejected)
    tok = np.concatenate(toks).astype(np.uint16)
    ln_a = np.array(ln, dtype=np.int64).T
    cs_a = np.array(cs, dtype=np.int64).T
    return BatchPlan([tok] * b, np.array(ps, dtype=np.int64), ln_a[0], cs_a, ln_a[1:], np.arange(b, dtype=np.int64) * 10)


def _brute_mask(batch: PackedBatch) -> np.ndarray:
    seq, part = batch.sequence_ids.numpy(), batch.token_part.numpy()
    r, t = seq.shape
    out = np.zeros((r, 1, t, t), dtype=bool)
    for i in range(r):
        for q in range(t):
            for k in range(t):
                if seq[i, q] < 0:
                    out[i, 0, q, k] = q == k
                else:
                    out[i, 0, q, k] = (seq[i, q] == seq[i, k] and k <= q
                                       and not (part[i, q] == REJECTED and part[i, k] == CHOSEN))
    return out


def check_against_padded(batch: PackedBatch, padded, row_bound: int | None = None, mult: int | None = None) -> None:
    """Every invariant of LAYOUTS.md against the padded batch of the same pairs."""
    shared = batch.layout == "prefix_shared"
    B = len(padded)
    assert len(batch) == B and torch.equal(batch.indices, padded.indices)
    R, T = batch.shape
    if mult:
        assert T % mult == 0
    ids, pos, seq = batch.input_ids, batch.position_ids, batch.sequence_ids
    am = batch.attention_mask
    assert torch.equal(am, seq >= 0) and torch.equal(am, batch.token_part >= 0)
    assert (ids[~am] == PAD).all() and (pos[~am] == 0).all()
    if row_bound:
        assert int(am.sum(1).max()) <= row_bound
    # sequences in row-major order of the real tokens, as cu_seqlens says
    flat_seq = seq[am]
    cu = batch.cu_seqlens.long()
    assert cu[0] == 0 and cu[-1] == am.sum() and batch.max_seqlen == int((cu[1:] - cu[:-1]).max())
    for s in range(len(cu) - 1):
        assert (flat_seq[cu[s]:cu[s + 1]] == s).all()
    # token content and positions of each pair, per side, equal the padded rows
    dense = batch.dense_mask()
    for b in range(B):
        P, C, R_ = (int(x[b]) for x in (padded.prompt_lengths, padded.chosen_lengths, padded.rejected_lengths))
        rows = {0: padded.preferred_seq[b, :P + C], 1: padded.unpreferred_seq[b, :P + R_]}
        if shared:
            sel = seq == b
            assert torch.equal(ids[sel], torch.cat([rows[0], rows[1][P:]]))
            assert pos[sel].tolist() == list(range(P + C)) + list(range(P, P + R_))
        else:
            for side in (0, 1):
                sel = seq == 2 * b + side
                assert torch.equal(ids[sel], rows[side])
                assert pos[sel].tolist() == list(range(len(rows[side])))
        for side, n in ((0, C), (1, R_)):
            k = (batch.score_pair == b) & (batch.score_side == side)
            assert int(k.sum()) == n  # every completion token scored exactly once
            assert torch.equal(batch.score_labels[k], rows[side][P:])
            ri, ci = batch.score_index[:, k]
            assert pos[ri, ci].tolist() == list(range(P - 1, P + n - 1))
            # the context each scoring position sees is exactly the padded row's prefix
            for j in range(n):
                keys = dense[ri[j], 0, ci[j]].nonzero().flatten()
                assert torch.equal(ids[ri[j], keys], rows[side][:P + j])
                assert pos[ri[j], keys].tolist() == list(range(P + j))
    assert len(batch.score_labels) == int((padded.chosen_lengths + padded.rejected_lengths).sum())


@given(plans(), st.sampled_from(LAYOUTS), st.sampled_from([None, 0, 24]), st.sampled_from([None, 8]))
@example(BatchPlan([np.arange(1, 4, dtype=np.uint16)], np.zeros(1, np.int64), np.ones(1, np.int64),
                   np.array([[1], [2]]), np.ones((2, 1), np.int64), np.zeros(1, np.int64)), "prefix_shared", None, None)
@settings(max_examples=30)
def test_layout_equals_padded_and_masks_follow_the_rule(plan, layout, max_row_tokens, mult):
    opts = PlanOptions(layout=layout, max_row_tokens=max_row_tokens, pad_to_multiple_of=mult)
    padded = assemble(*plan.args(), pad_id=PAD, indices=plan.indices)
    need = (plan.prompt_lengths * (1 if layout == "prefix_shared" else 2) + plan.completion_lengths.sum(0))
    if max_row_tokens and need.max() > opts.row_bound():
        with pytest.raises(OversizeError):
            build(plan, PAD, opts)
        return
    batch = build(plan, PAD, opts)
    check_against_padded(batch, padded, opts.row_bound() or None, mult)
    assert np.array_equal(batch.dense_mask().numpy(), _brute_mask(batch))
    assert batch.real_tokens() == int(need.sum()) and batch.padded_tokens() == batch.shape[0] * batch.shape[1]
    if max_row_tokens == 0:
        assert batch.shape[0] == len(plan)


def test_mask_mod_equals_the_dense_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    rng = np.random.default_rng(3)
    tok = rng.integers(1, 50, 200).astype(np.uint16)
    p = np.array([3, 1, 5]); c = np.array([[2, 4, 1], [3, 1, 2]])
    ps = np.array([0, 20, 40]); cs = np.stack([ps + p, ps + 10])
    plan = BatchPlan([tok] * 3, ps, p, cs, c, np.arange(3))
    for layout in LAYOUTS:
        batch = build(plan, PAD, PlanOptions(layout=layout, max_row_tokens=16))
        r, t = batch.shape
        try:
            got = fa.create_mask(batch.mask_mod(), r, 1, t, t, device="cpu")
        except Exception as e:  # noqa: BLE001  (an old torch without CPU support for create_mask)
            pytest.skip(f"create_mask on CPU: {e}")
        assert torch.equal(got.bool(), batch.dense_mask())


def test_block_mask_without_cuda_is_a_device_error():
    plan = BatchPlan([np.arange(1, 9, dtype=np.uint16)], np.zeros(1, np.int64), np.array([2]),
                     np.array([[2], [5]]), np.array([[3], [3]]), np.zeros(1, np.int64))
    batch = build(plan, PAD, PlanOptions(layout="prefix_shared"))
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="move it first"):
            batch.block_mask()
    else:
        with pytest.raises(DeviceError, match="CUDA|FlexAttention"):
            batch.block_mask()


# --- dataset and loader level ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ds_batch_and_collate_take_every_layout(ds, layout):  # noqa: F811
    from pairpack.batch.plan import Collate

    idx = np.array([5, 1, 77, 3, 120, 9])
    got = ds.batch(idx, layout=layout, max_length=12, max_row_tokens=40, pad_to_multiple_of=4, columns=())
    padded = ds.batch(idx, max_length=12)
    check_against_padded(got, padded, 40, 4)
    collate = Collate(ds, layout=layout, max_length=12, max_row_tokens=40, pad_to_multiple_of=4)
    col = collate(idx.tolist())  # leaves out pairs made identical by truncation
    assert collate.dropped == len(idx) - len(col) > 0
    kept = ds.batch(col.indices.numpy(), layout=layout, max_length=12, max_row_tokens=40, pad_to_multiple_of=4)
    assert torch.equal(col.input_ids, kept.input_ids) and torch.equal(col.score_index, kept.score_index)
    assert torch.equal(make_plan(ds, idx, truncation=Truncation(12)).assemble(
        ds.pad_id, options=PlanOptions(layout=layout, max_row_tokens=40, pad_to_multiple_of=4)).score_index,
        got.score_index)


@st.composite
def layout_options(draw):
    """test_loader's option sets (world size up to 8, sizes, budgets 64..2000) in a packed layout."""
    opts, epoch = draw(loader_options())
    opts.update(layout=draw(st.sampled_from(LAYOUTS)), max_row_tokens=draw(st.sampled_from([None, 0, 96])))
    if opts.get("max_tokens", 0) and opts["max_tokens"] < 200:
        opts["max_tokens"] = 200  # room for the smallest budget's longest pair in one row
    return opts, epoch


@given(layout_options())
@example(({"seed": 0, "shuffle": False, "drop_last": False, "group_by_length": False, "world_size": 1,
           "max_length": None, "truncation": "keep_end", "pad_to_multiple_of": None, "batch_size": 1,
           "layout": "packed", "max_row_tokens": 96}, 0))  # the row bound truncates: padded must too
@settings(max_examples=20)
def test_loader_layouts_partition_the_epoch_within_budget(ds, case):  # noqa: F811
    opts, epoch = case
    world = opts.pop("world_size")
    loaders = [Loader(ds, rank=r, world_size=world, **opts) for r in range(world)]
    for ld in loaders:
        ld.set_epoch(epoch)
    per_rank = [list(ld) for ld in loaders]
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts on every rank
    # the padded layout with the same truncation (a row bound caps max_length in packed layouts)
    same = {**opts, "layout": "padded", "max_row_tokens": None, "max_length": loaders[0].effective_max_length}
    padded = [Loader(ds, rank=r, world_size=world, **same) for r in range(world)] if opts.get("batch_size") else None
    seen = [i for bs in per_rank for b in bs for i in b.indices.tolist()]
    if opts["drop_last"] or len(seen) <= loaders[0].counts["used"]:
        assert len(seen) == len(set(seen)), "ranks overlap"
    eff = loaders[0].effective_max_length
    bound = loaders[0].options.row_bound()
    for bs in per_rank:
        for b in bs:
            assert isinstance(b, PackedBatch) and b.layout == opts["layout"]
            if opts.get("max_tokens"):
                assert b.padded_tokens() <= opts["max_tokens"]
            if bound:
                assert int(b.attention_mask.sum(1).max()) <= bound
            for j, i in enumerate(b.indices.tolist()):
                p, c, r = _reference(ds, i, eff, opts["truncation"])
                assert (int(b.prompt_lengths[j]), int(b.chosen_lengths[j]), int(b.rejected_lengths[j])) == \
                    (len(p), len(c), len(r))
                k = (b.score_pair == j) & (b.score_side == 0)
                assert b.score_labels[k].tolist() == c.tolist()
                k = (b.score_pair == j) & (b.score_side == 1)
                assert b.score_labels[k].tolist() == r.tolist()
    if padded is not None:  # batching by count: the same pairs as the padded layout, batch by batch
        for ld, bs in zip(padded, per_rank):
            ld.set_epoch(epoch)
            assert [b.indices.tolist() for b in ld] == [b.indices.tolist() for b in bs]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cut", [0, 2, 5])
def test_layout_resume_and_elastic_resume(ds, layout, cut):  # noqa: F811
    kw = dict(max_tokens=300, max_length=25, group_by_length=True, seed=4, layout=layout)
    full = [b.indices.tolist() for b in Loader(ds, rank=1, world_size=2, **kw)]
    a = Loader(ds, rank=1, world_size=2, **kw)
    head = [b.indices.tolist() for b in islice(iter(a), cut)]
    state = a.state_dict()
    assert state["options"]["layout"] == layout
    b = Loader(ds, rank=1, world_size=2, **kw)
    b.load_state_dict(state)
    assert head + [x.indices.tolist() for x in b] == full
    # elastic: 2 ranks served `cut` batches each, 3 ranks finish; every pair once
    served = set()
    for r in range(2):
        ld = Loader(ds, rank=r, world_size=2, **kw)
        served |= {i for x in islice(iter(ld), cut) for i in x.indices.tolist()}
    rest, counts = set(), set()
    for r in range(3):
        ld = Loader(ds, rank=r, world_size=3, **kw)
        ld.load_state_dict(state)
        got = [i for x in ld for i in x.indices.tolist()]
        counts.add(len(ld))
        assert not (set(got) & served)
        rest |= set(got)
    assert len(counts) == 1
    everything = set()
    for r in range(2):
        everything |= {i for x in Loader(ds, rank=r, world_size=2, **kw) for i in x.indices.tolist()}
    assert served | rest == everything


def test_state_from_another_layout_is_refused(ds):  # noqa: F811
    a = Loader(ds, batch_size=4, layout="prefix_shared")
    next(iter(a))
    state = a.state_dict()
    with pytest.raises(StateError, match="layout"):
        Loader(ds, batch_size=4).load_state_dict(state)
    with pytest.raises(StateError, match="layout"):
        Loader(ds, batch_size=4, layout="packed").load_state_dict(state)
    padded_state = Loader(ds, batch_size=4).state_dict()
    assert "layout" not in padded_state["options"]  # padded states are as before
    with pytest.raises(StateError, match="layout"):
        a.load_state_dict(padded_state)


def test_budget_smaller_than_one_pair_is_a_clear_error(ds):  # noqa: F811
    with pytest.raises(OversizeError, match="max_row_tokens=2"):
        Loader(ds, batch_size=4, layout="packed", max_row_tokens=2)
    with pytest.raises(PairpackError, match="max_tokens=2 cannot hold"):
        Loader(ds, max_tokens=2, layout="prefix_shared")
    with pytest.raises(OversizeError, match="exceed max_row_tokens=40"):
        list(Loader(ds, batch_size=4, layout="packed", max_row_tokens=40, oversize="error"))
    skipped = Loader(ds, batch_size=4, layout="packed", max_row_tokens=40, oversize="skip")
    assert skipped.counts["skipped_oversize"] > 0
    for b in skipped:
        assert int(b.attention_mask.sum(1).max()) <= 40
    with pytest.raises(ValueError, match="max_row_tokens applies"):
        Loader(ds, batch_size=4, max_row_tokens=40)


def test_identical_after_truncation_dropped_in_every_layout(ds):  # noqa: F811
    for layout in ("padded", *LAYOUTS):
        ld = Loader(ds, batch_size=8, max_length=4, layout=layout, shuffle=False)
        assert ld.counts["dropped_identical"] > 0
        got = [i for b in ld for i in b.indices.tolist()]
        assert len(got) == ld.counts["used"]
    ref = [b.indices.tolist() for b in Loader(ds, batch_size=8, max_length=4, shuffle=False)]
    assert [b.indices.tolist() for b in Loader(ds, batch_size=8, max_length=4, shuffle=False, layout="packed")] == ref


def test_packing_fills_rows_on_grouped_data(tmp_path):
    """Length-grouped HH-like pairs (long prompts, short answers) packed under a 16k budget fill >= 97%
    of it (a row wastes less than one pair: about 3% here)."""
    import pairpack

    rng = np.random.default_rng(0)
    with pairpack.Writer(tmp_path / "ds", vocab_size=1000, pad_id=PAD) as w:
        for _ in range(800):
            w.add(rng.integers(1, 1000, int(rng.integers(60, 200))).tolist(),
                  rng.integers(1, 1000, int(rng.integers(5, 40))).tolist(),
                  rng.integers(1, 1000, int(rng.integers(5, 40))).tolist())
    for layout in LAYOUTS:
        ld = Loader(tmp_path / "ds", max_tokens=16384, layout=layout, group_by_length=True, seed=1)
        real = sum(b.real_tokens() for b in ld)
        processed = sum(b.padded_tokens() for b in ld)
        budget_fill = sorted(b.real_tokens() / 16384 for b in ld)[1:]  # all but the epoch's remainder
        assert real / processed >= 0.97 and min(budget_fill) >= 0.97, (layout, real / processed, budget_fill[:3])


def test_stats_reports_tokens_per_pair_for_each_layout(ds):  # noqa: F811
    from pairpack.ops.stats import compute_stats

    for kw in (dict(batch_size=8), dict(max_tokens=600, max_row_tokens=0)):
        s = compute_stats(ds, max_lengths=[30], **kw)
        lay = s.layouts["layouts"]
        assert set(lay) == {"padded", "packed", "prefix_shared"}
        assert lay["padded"]["grouped"] >= lay["packed"]["grouped"] >= lay["prefix_shared"]["grouped"] >= \
            s.layouts["ideal"] > 0
        assert lay["padded"]["saving"] == 1.0 and lay["prefix_shared"]["saving"] > 1.0
        # the figures are the loader's: tokens processed by its batches, per pair
        ld = Loader(ds, group_by_length=True, layout="prefix_shared", seed=0,
                    **{**kw, "max_row_tokens": kw.get("max_row_tokens")})
        batches = list(ld)
        assert lay["prefix_shared"]["grouped"] == pytest.approx(
            sum(b.padded_tokens() for b in batches) / sum(len(b) for b in batches))
        assert "layouts (tokens the model processes per pair" in s.render()


@given(st.lists(st.integers(1, 60), min_size=0, max_size=200), st.integers(60, 200), st.booleans())
@example([30, 31, 29, 2], 60, False)  # a later unit fits an earlier row's gap
@settings(max_examples=60)
def test_best_fit_rows_are_what_next_fit_rebuilds(sizes, cap, decreasing):
    """The planner's best-fit rows, listed in its order, are exactly the rows the builder's next-fit
    makes of them (and of any run of whole rows); no row is over the bound and every unit is placed once."""
    from pairpack.batch.packing import best_fit_order, pack_rows

    need = np.array(sorted(sizes, reverse=True) if decreasing else sizes, dtype=np.int64)
    order, bounds = best_fit_order(need, cap)
    assert sorted(order.tolist()) == list(range(len(need)))
    assert np.array_equal(pack_rows(need[order], cap), bounds)
    csum = np.concatenate([[0], np.cumsum(need[order])])
    assert (np.diff(csum[bounds]) <= cap).all()
    if len(bounds) > 2:
        a = int(bounds[1])
        assert np.array_equal(pack_rows(need[order][a:], cap), bounds[1:] - a)


def test_bounded_rows_fill_on_grouped_half_row_pairs():
    """Grouped pairs near half the row bound (UltraFeedback-like under 2,048-token rows): best-fit
    decreasing fills the rows (first-fit over recent rows left them ~15% empty)."""
    from pairpack.batch.options import PlanOptions
    from pairpack.batch.plan import plan_batches, tokens_processed

    rng = np.random.default_rng(0)
    n = 4000
    p = rng.integers(20, 200, n)
    c, r = (np.clip(rng.lognormal(np.log(400), 0.5, n), 1, 900).astype(np.int64) for _ in range(2))
    lengths = np.stack([p, c, r]).astype(np.int64)
    opts = PlanOptions(max_tokens=16384, max_row_tokens=2048, layout="prefix_shared", group_by_length=True)
    batches = plan_batches(lengths, np.arange(n), options=opts)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    per_pair = tokens_processed(lengths, batches, opts) / n
    assert per_pair <= 1.03 * lengths.sum(0).mean()


def test_stats_cli_layout_table_and_bad_row_bound(ds):  # noqa: F811
    from .conftest import run_cli

    out = run_cli("stats", str(ds.path), "--max-tokens", "600", "--max-row-tokens", "0")
    assert out.returncode == 0, out.stderr
    assert "layouts (tokens the model processes per pair" in out.stdout and "one pair per row" in out.stdout
    assert "prefix shared" in out.stdout
    bad = run_cli("stats", str(ds.path), "--max-row-tokens", "2")
    assert bad.returncode == 2 and "max_row_tokens=2 cannot hold" in bad.stderr
