"""The compiled kernels (``pairpack/_native.c``) against the numpy path they replace.

Same bytes for any dataset, batch and plan; the same errors; and whatever coordinates the kernels
are handed, either the exact result or a ValueError: never a read outside a token buffer.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from pairpack import _accel
from pairpack.batch.triplets import Triplets, assemble

from .strategies import DatasetSpec, datasets_spec, scratch_dir

native = _accel.native
needs_native = pytest.mark.skipif(native is None, reason="pairpack._native is not built")
FIELDS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask",
          "indices", "prompt_lengths", "chosen_lengths", "rejected_lengths")


@contextmanager
def numpy_path() -> Iterator[None]:
    saved = _accel.native
    _accel.native = None
    try:
        yield
    finally:
        _accel.native = saved


def assert_same(a: Triplets, b: Triplets) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f
        assert x.is_contiguous(), f
    assert a.columns.keys() == b.columns.keys()
    for k in a.columns:
        assert a.columns[k].dtype == b.columns[k].dtype and torch.equal(a.columns[k], b.columns[k]), k


def test_built_where_a_compiler_is() -> None:
    """CI has a C compiler, so a silently failed build (numpy path everywhere) fails here."""
    if os.environ.get("PAIRPACK_NATIVE", "").strip() == "0":
        pytest.skip("PAIRPACK_NATIVE=0")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the numpy path serves")
    assert native is not None, "pairpack._native is not built: `pip install -e .` compiles pairpack/_native.c"


# --- datasets: take() and batch() -------------------------------------------------------------
@needs_native
@given(spec=datasets_spec(min_pairs=1, max_pairs=10),
       raw=st.lists(st.integers(-1000, 1000), max_size=16),
       multiple=st.one_of(st.none(), st.sampled_from([1, 8, 64])))
@example(spec=DatasetSpec(pairs=[([65536, 1], [2], [65535, 3, 4]), ([7], [8], [9])], pad_id=65535, shard_bytes=8),
         raw=list(range(8)), multiple=None)
def test_dataset_paths_agree(spec: DatasetSpec, raw: list[int], multiple: int | None) -> None:
    n = len(spec.pairs)
    idx = [r % (2 * n) - n for r in raw]
    cols = sorted(spec.columns)
    with scratch_dir() as d:
        ds = spec.write(Path(d) / "ds")
        got_t = ds.take(idx, cols)
        got = ds.batch(idx, pad_to_multiple_of=multiple, columns=cols)
        with numpy_path():
            ref_t = ds.take(idx, cols)
            ref = ds.batch(idx, pad_to_multiple_of=multiple, columns=cols)
        assert_same(got, ref)
        for k in ("indices", "starts", "lengths"):
            assert np.array_equal(getattr(got_t, k), getattr(ref_t, k)), k
        assert all(a is b for a, b in zip(got_t.tokens, ref_t.tokens)) and len(got_t.tokens) == len(idx)
        if idx:
            ln = ref_t.lengths
            assert got_t.longest == int(max((ln[0] + ln[1]).max(), (ln[0] + ln[2]).max()))


# --- plans: assemble() on arbitrary coordinates ----------------------------------------------------
@st.composite
def plans(draw: st.DrawFn) -> dict:
    """Coordinates over two or three token arrays (uint16 and/or uint32, the largest ids present),
    any pad_id the dtype holds (sometimes one it does not), optional pad_to_multiple_of."""
    dts = draw(st.lists(st.sampled_from([np.uint16, np.uint32]), min_size=2, max_size=3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arrays = []
    for dt in dts:
        hi = int(np.iinfo(dt).max)
        a = rng.integers(0, hi, draw(st.integers(1, 300)), endpoint=True, dtype=np.uint64).astype(dt)
        a[rng.integers(0, len(a), 3)] = hi
        arrays.append(a)
    b = draw(st.integers(1, 12))
    which = rng.integers(0, len(arrays), b) if draw(st.booleans()) else np.zeros(b, dtype=np.int64)
    tokens = [arrays[k] for k in which.tolist()]
    size = np.array([len(t) for t in tokens])

    def seg(min_len: int) -> tuple[np.ndarray, np.ndarray]:
        ln = np.minimum(rng.integers(min_len, 40, b), size)
        return (rng.random(b) * (size - ln + 1)).astype(np.int64), ln.astype(np.int64)

    ps, pl = seg(0)
    c0, l0 = seg(0)
    c1, l1 = seg(0)
    if draw(st.booleans()):  # the writer's layout: chosen stored right after its prompt
        c0 = np.minimum(ps + pl, size - l0)
    pad = draw(st.sampled_from([0, 1, 65535, 65536, 2**32 - 1]))
    return dict(tokens=tokens, prompt_starts=ps, prompt_lengths=pl, completion_starts=np.stack([c0, c1]),
                completion_lengths=np.stack([l0, l1]), pad_id=pad,
                pad_to_multiple_of=draw(st.sampled_from([None, 1, 8, 64])),
                indices=rng.integers(-5, 10**6, b), columns={"score": rng.standard_normal(b).astype(np.float32)})


def _result_or_error(fn, **kw):
    try:
        return fn(**kw)
    except Exception as e:  # noqa: BLE001 - compared by type and message
        return type(e), str(e)


@needs_native
@given(plan=plans())
def test_assemble_paths_agree(plan: dict) -> None:
    """Same batch (or the same error: a pad_id too large for the dtype) from both paths; mixed
    dtypes fall back to numpy inside assemble and still agree."""
    got = _result_or_error(assemble, **plan)
    with numpy_path():
        ref = _result_or_error(assemble, **plan)
    if isinstance(ref, tuple):
        assert got == ref
    else:
        assert_same(got, ref)


# --- the kernels on hostile coordinates ---------------------------------------------------------
def _reference_rows(tok: np.ndarray, ps, pl, cs, cl, n: int, pad: int) -> np.ndarray:
    out = np.full((2, len(ps), n), pad, dtype=np.int64)
    for s in range(2):
        for i in range(len(ps)):
            row = np.concatenate([tok[ps[i]:ps[i] + pl[i]], tok[cs[s][i]:cs[s][i] + cl[s][i]]])
            out[s, i, :len(row)] = row
    return out


coords = st.integers(-5, 40) | st.sampled_from([2**62, -(2**62), 2**63 - 1])


@needs_native
@given(t=st.integers(0, 30), rows=st.lists(st.tuples(*[coords] * 6), min_size=1, max_size=5),
       n=st.integers(0, 60) | st.integers(60, 300), dtype=st.sampled_from([np.uint16, np.uint32]),
       pad=st.sampled_from([0, 3, 2**32 - 1]))
@example(t=10, rows=[(8, 2, 10, 0, 0, 0)], n=2, dtype=np.uint16, pad=0)  # a segment ending exactly at the end
@example(t=10, rows=[(9, 2, 0, 1, 0, 1)], n=5, dtype=np.uint16, pad=0)  # one token past the end
@example(t=10, rows=[(2**63 - 1, 2**63 - 1, 0, 1, 0, 1)], n=5, dtype=np.uint32, pad=0)  # start + length overflows
@example(t=10, rows=[(0, 2, 2, 3, 5, 1)], n=300, dtype=np.uint32, pad=3)  # long padding: the fast-string fill
def test_kernel_assemble_never_reads_outside(t: int, rows: list, n: int, dtype: type, pad: int) -> None:
    tok = np.arange(100, 100 + t).astype(dtype)
    a = np.array(rows, dtype=np.int64).T  # (6, B): ps, pl, c0, l0, c1, l1
    ps, pl, cs, cl = a[0].copy(), a[1].copy(), a[[2, 4]].copy(), a[[3, 5]].copy()
    out = np.full((2, len(ps), n), -7, dtype=np.int64)
    masks = np.zeros((3, len(ps), n), dtype=np.bool_)
    inside = all(0 <= s <= t and 0 <= ln <= t - s for s, ln in
                 [(ps[i], pl[i]) for i in range(len(ps))] + [(cs[k][i], cl[k][i]) for k in (0, 1) for i in range(len(ps))])
    fits = inside and bool(((pl + cl) <= n).all())
    if not fits:
        with pytest.raises(ValueError):
            native.assemble((tok,), None, ps, pl, cs, cl, n, 0, out, masks)
        assert (out == -7).all() and not masks.any()  # nothing written
        return
    native.assemble((tok,), None, ps, pl, cs, cl, n, pad, out, masks)
    assert np.array_equal(out, _reference_rows(tok, ps, pl, cs, cl, n, pad))
    j = np.arange(n)
    assert np.array_equal(masks[0], j < pl[:, None])
    assert np.array_equal(masks[1:], j < (pl + cl)[:, :, None])


@needs_native
def test_kernel_rejects_malformed_arguments() -> None:
    tok = np.arange(10, dtype=np.uint16)
    one = np.ones(1, dtype=np.int64)
    z2 = np.zeros((2, 1), dtype=np.int64)
    out = np.empty((2, 1, 4), dtype=np.int64)
    ok = ((tok,), None, one * 0, one, z2, z2 + 1, 4, 0, out, None)
    native.assemble(*ok)
    bad = {
        0: ((), TypeError), 1: (np.array([1], dtype=np.int64), ValueError),  # shard 1 of 1
        3: (np.ones(2, dtype=np.int64), ValueError),  # prompt_lengths of the wrong size
        6: (5, ValueError),  # out sized for n = 4
        8: (np.empty((2, 1, 4), dtype=np.int32), ValueError),
    }
    for pos, (value, err) in bad.items():
        args = list(ok)
        args[pos] = value
        with pytest.raises(err):
            native.assemble(*args)
    two = np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="uint16 or all uint32"):  # a batch over both shards
        native.assemble((tok, tok.astype(np.uint32)), np.array([0, 1]), two, two + 1, np.zeros((2, 2), np.int64),
                        np.ones((2, 2), np.int64), 4, 0, np.empty((2, 2, 4), np.int64), None)
    with pytest.raises(ValueError, match="read-only"):  # a read-only output
        ro = out.copy()
        ro.flags.writeable = False
        native.assemble(*ok[:8], ro, None)
    with pytest.raises(ValueError, match="contiguous"):  # a strided view is refused, not misread
        native.assemble(*ok[:4], np.zeros((2, 2), dtype=np.int64)[:, :1], *ok[5:])


@needs_native
@given(t=st.integers(0, 20), n_pairs=st.integers(1, 4),
       cells=st.lists(coords, min_size=6, max_size=6), raw=st.lists(st.integers(-10, 10), max_size=6))
def test_kernel_take_checks_every_pair(t: int, n_pairs: int, cells: list[int], raw: list[int]) -> None:
    """take() on one shard whose first pair has arbitrary coordinates: out-of-range indices raise
    IndexError, a bad segment ValueError, otherwise the coordinates come back exactly."""
    st_ = np.zeros((3, n_pairs), dtype=np.int64)
    ln = np.ones((3, n_pairs), dtype=np.int64) * min(t, 1)
    st_[:, 0], ln[:, 0] = cells[:3], cells[3:]
    idx = np.array(raw, dtype=np.int64)
    co = np.zeros((8, len(idx)), dtype=np.int64)
    args = (idx, n_pairs, np.array([0, n_pairs], dtype=np.int64), (st_,), (ln,), np.array([t], dtype=np.int64), co)
    if ((idx < -n_pairs) | (idx >= n_pairs)).any():
        with pytest.raises(IndexError):
            native.take(*args)
        return
    g = np.where(idx < 0, idx + n_pairs, idx)
    s, l_ = st_[:, g], ln[:, g]
    if ((s < 0) | (l_ < 1) | (s > t) | (l_ > t - np.minimum(s, t))).any():
        with pytest.raises(ValueError):
            native.take(*args)
        return
    longest = native.take(*args)
    assert np.array_equal(co[0], g) and not co[1].any()
    assert np.array_equal(co[2:5], s) and np.array_equal(co[5:8], l_)
    assert longest == (int(max((l_[0] + l_[1]).max(), (l_[0] + l_[2]).max())) if len(g) else 0)


# --- layouts: the packed / prefix_shared builder (batch/layouts.py) ------------------------------
def assert_same_packed(a, b) -> None:
    """Every field of two PackedBatches equal: tensors in dtype, shape and value; the rest exactly."""
    from dataclasses import fields as dc_fields

    for f in dc_fields(a):
        if f.name.startswith("_"):  # the derived scoring map's cache: compared below
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name
            assert x.is_contiguous(), f.name
        elif isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
        else:
            assert x == y, f.name


@needs_native
@given(plan=plans(), layout=st.sampled_from(["packed", "prefix_shared"]),
       row=st.sampled_from([None, 0, 40, 80, 160, 1000]))
@example(plan=dict(tokens=[np.arange(6, dtype=np.uint16)] * 2, prompt_starts=np.array([0, 1]),
                   prompt_lengths=np.array([2, 1]), completion_starts=np.array([[2, 3], [4, 0]]),
                   completion_lengths=np.array([[1, 0], [0, 2]]), pad_id=65535, pad_to_multiple_of=8,
                   indices=np.array([3, 4]), columns={}), layout="prefix_shared", row=4)  # empty completions
def test_layout_paths_agree(plan: dict, layout: str, row: int | None) -> None:
    """The C builder (``_native.layout``) and its numpy twin give the same PackedBatch, field for
    field, over any coordinates, dtypes, pad ids, row bounds and multiples (or the same error:
    a pair over the row bound, a pad_id the dtype cannot hold)."""
    from pairpack.batch.layouts import build
    from pairpack.batch.options import PlanOptions
    from pairpack.batch.plan import BatchPlan

    bp = BatchPlan(plan["tokens"], plan["prompt_starts"], plan["prompt_lengths"], plan["completion_starts"],
                   plan["completion_lengths"], plan["indices"], plan["columns"])
    opts = PlanOptions(layout=layout, max_row_tokens=row, pad_to_multiple_of=plan["pad_to_multiple_of"])
    got = _result_or_error(build, plan=bp, pad_id=plan["pad_id"], options=opts)
    with numpy_path():
        ref = _result_or_error(build, plan=bp, pad_id=plan["pad_id"], options=opts)
    if isinstance(ref, tuple) or isinstance(got, tuple):
        assert type(got) is tuple and type(ref) is tuple and got[0] is ref[0], (got, ref)
    else:
        assert_same_packed(got, ref)


@needs_native
@given(spec=datasets_spec(min_pairs=1, max_pairs=10), raw=st.lists(st.integers(-1000, 1000), max_size=16),
       layout=st.sampled_from(["packed", "prefix_shared"]), row=st.sampled_from([None, 0, 64]),
       max_length=st.sampled_from([None, 3, 8]))
def test_dataset_layout_paths_agree(spec: DatasetSpec, raw: list[int], layout: str, row: int | None,
                                    max_length: int | None) -> None:
    """ds.batch in a packed layout: the two-C-call path (locate, layout; plan-free) and the numpy
    path give the same batch or the same error, with truncation (where the C path steps aside),
    row bounds, several shards, negative and repeated indices and columns."""
    n = len(spec.pairs)
    idx = [r % (2 * n) - n for r in raw]
    cols = sorted(spec.columns)
    kw = dict(layout=layout, max_row_tokens=row, max_length=max_length, columns=cols)
    with scratch_dir() as d:
        ds = spec.write(Path(d) / "ds")
        got = _result_or_error(ds.batch, indices=idx, **kw)
        with numpy_path():
            ref = _result_or_error(ds.batch, indices=idx, **kw)
        if isinstance(ref, tuple) or isinstance(got, tuple):
            assert type(got) is tuple and type(ref) is tuple and got[0] is ref[0], (got, ref)
        else:
            assert_same_packed(got, ref)


def _layout_outs(r: int, t: int, s: int) -> tuple[np.ndarray, ...]:
    e = np.full
    return (e((r, t), -7, np.int64), e((r, t), -7, np.int64), e((r, t), -7, np.int32), e((r, t), -7, np.int8),
            np.zeros((r, t), np.bool_), e(s + 1, -7, np.int32), e(s, -7, np.int64), e(s, -7, np.int8),
            e((s, 2), -7, np.int64))


@needs_native
@given(t=st.integers(0, 30), rows=st.lists(st.tuples(*[coords] * 6), min_size=1, max_size=4),
       shared=st.booleans(), extra=st.integers(0, 3), dtype=st.sampled_from([np.uint16, np.uint32]))
@example(t=10, rows=[(9, 2, 0, 1, 0, 1)], shared=True, extra=0, dtype=np.uint16)  # one token past the end
@example(t=10, rows=[(2**63 - 1, 2**63 - 1, 0, 1, 0, 1)], shared=False, extra=0, dtype=np.uint32)
@example(t=10, rows=[(0, 2**62, 0, 2**62, 0, 2**62)], shared=True, extra=0, dtype=np.uint16)  # huge lengths
def test_kernel_layout_never_reads_outside(t: int, rows: list, shared: bool, extra: int, dtype: type) -> None:
    """layout() on one shard with arbitrary coordinates, all pairs in one row: a segment outside
    the buffer is a ValueError with nothing written; otherwise the numpy twin's bytes."""
    from pairpack.batch.layouts import build
    from pairpack.batch.options import PlanOptions
    from pairpack.batch.plan import BatchPlan

    tok = np.arange(100, 100 + t).astype(dtype)
    a = np.array(rows, dtype=np.int64).T
    ps, pl, cs, cl = a[0].copy(), a[1].copy(), a[[2, 4]].copy(), a[[3, 5]].copy()
    b = len(ps)
    inside = all(0 <= s <= t and 0 <= ln <= t - s for s, ln in
                 [(ps[i], pl[i]) for i in range(b)] + [(cs[k][i], cl[k][i]) for k in (0, 1) for i in range(b)])
    if not inside:
        # sized as if the coordinates were honest: whatever the sizes, nothing is read or written
        outs = _layout_outs(1, 8, b if shared else 2 * b)
        before = [o.copy() for o in outs]
        with pytest.raises(ValueError, match="outside shard"):  # the coordinates' fault, not the sizes'
            native.layout((tok,), None, ps, pl, cs, cl, np.array([0, b], dtype=np.int64), shared, 0, outs)
        assert all(np.array_equal(o, x) for o, x in zip(outs, before))
        return
    need = (pl + cl.sum(0)) if shared else (2 * pl + cl.sum(0))
    width = int(need.sum()) + extra
    outs = _layout_outs(1, width, b if shared else 2 * b)
    longest = native.layout((tok,), None, ps, pl, cs, cl, np.array([0, b], dtype=np.int64), shared, 3, outs)
    with numpy_path():
        ref = build(BatchPlan([tok] * b, ps, pl, cs, cl, np.arange(b)), 3,
                    PlanOptions(layout="prefix_shared" if shared else "packed"))
    names = ("input_ids", "position_ids", "sequence_ids", "token_part", "attention_mask", "cu_seqlens",
             "sequence_pair", "sequence_side", "completion_span")
    for name, o in zip(names, outs):
        r = getattr(ref, name).numpy()
        if name in names[:5]:
            o = o[:, :r.shape[1]]
            assert (outs[4][:, r.shape[1]:] == 0).all()  # the extra columns are padding
        assert np.array_equal(o, r), name
    assert longest == ref.max_seqlen


@needs_native
def test_kernel_layout_rejects_malformed_arguments() -> None:
    tok = np.arange(10, dtype=np.uint16)
    one = np.ones(1, dtype=np.int64)
    z2 = np.zeros((2, 1), dtype=np.int64)
    rows = np.array([0, 1], dtype=np.int64)
    ok = ((tok,), None, one * 0, one, z2, z2 + 1, rows, False, 0, _layout_outs(1, 4, 2))
    native.layout(*ok)
    bad = {
        0: ((), TypeError), 1: (np.array([1], dtype=np.int64), ValueError),  # shard 1 of 1
        3: (np.ones(2, dtype=np.int64), ValueError),  # prompt lengths of the wrong size
        6: (np.array([0, 2], dtype=np.int64), ValueError),  # rows past the pair count
        9: (_layout_outs(1, 3, 2), ValueError),  # a row of 4 tokens in T = 3
    }
    for pos, (value, err) in bad.items():
        args = list(ok)
        args[pos] = value
        with pytest.raises(err):
            native.layout(*args)
    outs = list(_layout_outs(1, 4, 2))
    outs[6] = np.empty(3, np.int64)  # sequence_pair of the wrong size
    with pytest.raises(ValueError, match="sequence_pair"):
        native.layout(*ok[:9], tuple(outs))
    with pytest.raises(ValueError, match="rows decrease"):
        native.layout(*ok[:6], np.array([0, 2, 1, 1], dtype=np.int64), False, 0, _layout_outs(3, 4, 2))
    with pytest.raises(TypeError, match="9 buffers"):
        native.layout(*ok[:9], ok[9][:8])

# --- the C JSONL reader of `pairpack build` ------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=6)
ID_FORMS = ["1.0", "-1", "true", '"5"', "99999999999999999999", "01", "1e2", "-0", "[]", "null", "1100"]
# number literals at the edges of what orjson reads: overflow to infinity (an error), underflow to
# 0.0, integers past 64 bits (read as floats), -0, leading zeros and bare forms (errors), long exponents
EDGE_NUMBERS = ["1e999", "-1e999", "2e308", "1E400", "1.8e308", "1.7976931348623157e308", "1e-400", "2e-324",
                "4.9e-324", "-0", "-0.0", "0e0", "1e3", "1E+2", "1e-2", "9e99", "1e099", "1e0099", "123456789012345",
                "1234567890123456", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
                "123456789012345678901234567890", "01", "-01", "00", "1.", ".5", "+1", "1e", "1e+", "-", "0x10",
                "Infinity", "NaN", "1.5e-05"]
JSON_STRINGS = ['"\\"\\\\\\/\\b\\f\\n\\r\\t"', '"\\u00e9\\u0000"', '"\\ud83d\\ude00"', '"\\ud800"',
                '"\\ude00\\ud83d"', '"\\x41"', '"\\U0041"', '"\\u12"', '"a\x00b"', '"\xed\xa0\x80"',
                '"\xf0\x9f\x98\x80"', '"\xc0\xaf"', '"\xf4\x90\x80\x80"', '"tab\there"']
CORRUPT = ["drop_key", "dup_key", "bad_id", "empty", "ff_char", "garbage", "bad_utf8", "blank", "crlf", "not_object",
           "escaped_key", "surrogate", "deep", "number_extra", "number_nested", "number_id", "string_extra",
           "string_key", "bom", "dup_extra", "dup_target_same", "nul_outside", "nul_line"]


@st.composite
def number_literals(draw: st.DrawFn) -> str:
    """JSON-like number text, valid or not: sign, integer part (leading zeros, up to 30 digits),
    fraction, and an exponent of up to four digits (leading zeros, signs)."""
    digits = st.text("0123456789", min_size=1, max_size=30)
    out = draw(st.sampled_from(["", "-"])) + draw(digits)
    if draw(st.booleans()):
        out += "." + draw(st.text("0123456789", max_size=20))
    if draw(st.booleans()):
        out += draw(st.sampled_from("eE")) + draw(st.sampled_from(["", "+", "-"])) + draw(
            st.text("0123456789", max_size=4))
    return out


@st.composite
def jsonl_lines(draw: st.DrawFn) -> bytes:
    """Lines of pre-tokenized records, most valid (keys in any order, any spacing, extra fields of
    any JSON value, non-ASCII text), some corrupted in the ways the C reader must hand back."""
    out = []
    corrupt_one_in = draw(st.sampled_from([0, 0, 0, 10, 3]))  # half the files are all valid records
    extras = draw(st.booleans())
    for _ in range(draw(st.integers(1, 8))):
        ids = {k: draw(st.lists(st.integers(0, 999), min_size=1, max_size=6)) for k in ("prompt", "chosen", "rejected")}
        if draw(st.integers(0, 5)) == 0:
            ids["rejected"] = list(ids["chosen"])  # identical completions
        rec: dict = dict(ids)
        if extras:
            for k, v in draw(st.dictionaries(st.sampled_from(["id", "meta", "src", "é"]), json_values,
                                             max_size=2)).items():
                rec[k] = v
        keys = draw(st.permutations(list(rec)))
        sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]))
        text = "{" + sep[0].join(json.dumps(k) + sep[1] + json.dumps(rec[k], ensure_ascii=draw(st.booleans()),
                                                                    separators=sep) for k in keys) + "}"
        line = (draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\r"]))).encode()
        if corrupt_one_in and draw(st.integers(1, corrupt_one_in)) == 1:
            how = draw(st.sampled_from(CORRUPT))
            if how == "drop_key":
                line = line.replace(b'"chosen"', b'"chosenX"')
            elif how == "dup_key":
                line = line.replace(b"{", b'{"prompt":[3],', 1)
            elif how == "bad_id":
                line = line.replace(b"[", b"[" + draw(st.sampled_from(ID_FORMS)).encode() + b",", 1)
            elif how == "empty":
                line = line.replace(b'"rejected"' + sep[1].encode() + b"[", b'"rejected"' + sep[1].encode() + b"[]+", 1)
            elif how == "ff_char":
                line = b"\x0c" + line
            elif how == "garbage":
                line = line + b"x"
            elif how == "bad_utf8":
                line = line.replace(b"{", b'{"z":"\xff",', 1)
            elif how == "blank":
                line = draw(st.sampled_from([b"", b" ", b"\r", b"\x0b", b"\x0c \t"]))
            elif how == "crlf":
                line = line + b"\r"
            elif how == "not_object":
                line = b"[" + line + b"]"
            elif how == "escaped_key":
                line = line.replace(b'"prompt"', b'"pro\\u006dpt"')
            elif how == "surrogate":
                line = line.replace(b"{", b'{"z":"\\ud83d\\ude00",', 1)
            elif how == "deep":
                line = line.replace(b"{", b'{"z":' + b"[" * 70 + b"]" * 70 + b",", 1)
            elif how in ("number_extra", "number_nested", "number_id"):
                num = draw(st.sampled_from(EDGE_NUMBERS) | number_literals()).encode()
                if how == "number_id":  # as the first id of the first list
                    line = line.replace(b"[", b"[" + num + b",", 1)
                else:  # in a field pairpack does not read, alone or inside a list and an object
                    value = num if how == "number_extra" else b'[1,{"k":' + num + b"}]"
                    line = line.replace(b"{", b'{"score":' + value + b",", 1)
            elif how in ("string_extra", "string_key"):
                text = draw(st.sampled_from(JSON_STRINGS)).encode("latin-1")
                line = line.replace(b"{", b"{" + (text + b":1," if how == "string_key" else b'"s":' + text + b","), 1)
            elif how == "bom":
                line = b"\xef\xbb\xbf" + line
            elif how == "dup_extra":  # orjson keeps the last of repeated keys
                line = line.replace(b"{", b'{"x":1,"x":[2],', 1)
            elif how == "dup_target_same":
                line = line.replace(b"{", b'{"chosen":[1],', 1).replace(b"}", b',"chosen":[1]}', 1)
            elif how == "nul_outside":
                line = line.replace(b"{", b"{\x00", 1)
            elif how == "nul_line":
                line = b"\x00"
        out.append(line)
    return b"\n".join(out) + draw(st.sampled_from([b"", b"\n"]))


def _build_outcome(src: Path, out: Path, drop: bool, skip_invalid: bool = True) -> object:
    import pairpack

    try:
        rep = pairpack.build([src], out, force=True, vocab_size=1000, skip_invalid=skip_invalid, drop_identical=drop,
                             workers=1, progress=False)
    except Exception as e:  # noqa: BLE001 - compared by type and message
        return type(e).__name__, str(e).replace(str(out), "OUT")
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    rejects = Path(rep.rejects_file).read_text() if rep.rejects_file else None
    return (rep.pairs, dict(rep.rejected), rep.identical, rep.identical_dropped, rep.tokens, files, rejects)


@needs_native
@given(data=jsonl_lines(), drop=st.booleans())
@example(data=b'{"prompt":[1],"chosen":[2],"rejected":[2]}\n\x0b\n{"rejected":[7],"chosen":[5, 6],"prompt":[3]}',
         drop=True)
@example(data=b'{"prompt":[999],"chosen":[2],"rejected":[1000]}', drop=False)  # the limit itself
@example(data=b'{"prompt":[1],"chosen":[2],"rejected":[3],"x":"\xed\xa0\x80"}', drop=False)  # UTF-8 surrogate
def test_build_reader_paths_agree(data: bytes, drop: bool) -> None:
    """A JSONL file builds to the same bytes, counts and rejects with the C reader and without."""
    with scratch_dir() as d:
        src = Path(d) / "in.jsonl"
        src.write_bytes(data)
        got = _build_outcome(src, Path(d) / "a", drop)
        with numpy_path():
            ref = _build_outcome(src, Path(d) / "b", drop)
    assert got == ref


# Lines on which the C reader and the exact path disagreed (the first four, before skip_number
# bounded exponents) or could: number literals at the edges and the other JSON corners.
_OK = b'"prompt":[1,2],"chosen":[3],"rejected":[4]'
DIVERGENCE_CORPUS = [
    b"{" + _OK + b',"score":1e999}', b"{" + _OK + b',"score":-1e999}', b"{" + _OK + b',"score":2e308}',
    b'{"meta":{"x":[1E400]},' + _OK + b"}", b"{" + _OK + b',"score":1e099}', b"{" + _OK + b',"score":1e-400}',
    b"{" + _OK + b',"n":18446744073709551616}', b"{" + _OK + b',"n":123456789012345678901234567890}',
    b"{" + _OK + b',"n":-0}', b"{" + _OK + b',"n":01}', b"{" + _OK + b',"n":1.}',
    b'{"prompt":[1e3],"chosen":[3],"rejected":[4]}', b'{"prompt":[-0],"chosen":[3],"rejected":[4]}',
    b'{"prompt":[00],"chosen":[3],"rejected":[4]}', b'{"prompt":[18446744073709551616],"chosen":[3],"rejected":[4]}',
    b'{"prompt":[1.0],"chosen":[3],"rejected":[4]}',
    b"\xef\xbb\xbf{" + _OK + b"}", b"{" + _OK + b',"s":"\\ud800"}', b"{" + _OK + b',"s":"\\ud83d\\ude00"}',
    b"{" + _OK + b',"s":"a\x00b"}', b"{" + _OK + b',"s":"\\u0000"}', b"{\x00" + _OK + b"}", b"\x00",
    b"{" + _OK + b',"x":1,"x":2}', b'{"chosen":[3],' + _OK + b"}", b'{"pro\\u006dpt":[5],' + _OK + b"}",
]


@needs_native
@pytest.mark.parametrize("line", DIVERGENCE_CORPUS, ids=range(len(DIVERGENCE_CORPUS)))
@pytest.mark.parametrize("skip_invalid", [True, False])
def test_divergence_corpus(line: bytes, skip_invalid: bool) -> None:
    """Each line, after a valid one, builds to the same bytes or fails with the same error on both paths;
    the C reader hands every line of the corpus but the plain ones to the exact path."""
    data = b'{"prompt":[7],"chosen":[8],"rejected":[9]}\n' + line + b"\n"
    with scratch_dir() as d:
        src = Path(d) / "in.jsonl"
        src.write_bytes(data)
        got = _build_outcome(src, Path(d) / "a", False, skip_invalid)
        with numpy_path():
            ref = _build_outcome(src, Path(d) / "b", False, skip_invalid)
    assert got == ref
    tok, ln = np.zeros(64, dtype=np.uint32), np.zeros((3, 8), dtype=np.int64)
    scanned = native.scan_ids(data, (b"prompt", b"chosen", b"rejected"), 1000, False, 1 << 20, tok, ln)
    if line.endswith((b"1e999}", b"-1e999}", b"2e308}", b"1E400]}},")) or b"1E400" in line or b"e099" in line:
        assert scanned is None, line


@needs_native
def test_scan_ids_reads_what_it_accepts() -> None:
    """Direct checks of the C reader: key order restored, identical pairs counted/dropped, and it
    gives up (None) on the first line it is not sure of."""
    keys = (b"prompt", b"chosen", b"rejected")
    data = (b'{"rejected":[7],"chosen":[5,6],"prompt":[3],"meta":{"a":[1.5,"\xc3\xa9"]}}\n\n'
            b' {"prompt":[1],"chosen":[2],"rejected":[2]}\r\n')
    tok = np.zeros(64, dtype=np.uint32)
    ln = np.zeros((3, 8), dtype=np.int64)
    assert native.scan_ids(data, keys, 1000, False, 1 << 20, tok, ln) == (7, 2, 2, 1, 0)
    assert tok[:7].tolist() == [3, 5, 6, 7, 1, 2, 2] and ln[:, :2].tolist() == [[1, 1], [2, 1], [1, 1]]
    assert native.scan_ids(data, keys, 1000, True, 1 << 20, tok, ln) == (4, 1, 2, 1, 1)
    for bad in (b'{"prompt":[1],"chosen":[2],"rejected":[1000]}', b'{"prompt":[1],"chosen":[2]}',
                b'{"prompt":[1],"chosen":[2],"rejected":[3]', b'{"prompt":[1],"prompt":[1],"chosen":[2],"rejected":[3]}',
                b'{"prompt":[1],"chosen":[2],"rejected":[true]}', b'{"prompt":[1],"chosen":[2],"rejected":[3]} 1'):
        assert native.scan_ids(bad, keys, 1000, False, 1 << 20, tok, ln) is None, bad
    assert native.scan_ids(data, keys, 1000, False, 10, tok, ln) is None  # a line over max_record_bytes
    assert native.scan_ids(data, keys, 1000, False, 1 << 20, tok[:3], ln) is None  # no room: gives up
    ok = b'{"prompt":[1],"chosen":[2],"rejected":[3],"s":%s}'
    for harmless in (b"-0", b"1.5e-05", b"9e99", b"-1E+99", b"123456789012345", b"0.25"):
        assert native.scan_ids(ok % harmless, keys, 1000, False, 1 << 20, tok, ln) == (3, 1, 1, 0, 0), harmless
    for unproven in (b"1e999", b"1e100", b"1e-400", b"1e099", b"1234567890123456", b"1.0000000000000001"):
        assert native.scan_ids(ok % unproven, keys, 1000, False, 1 << 20, tok, ln) is None, unproven
    for limit, max_record in ((-1, 10), (2**32 + 1, 10), (1000, -1)):
        with pytest.raises(ValueError):
            native.scan_ids(data, keys, limit, False, max_record, tok, ln)


@needs_native
def test_kernel_take_validates_its_arguments() -> None:
    """take() checks its own arguments: zero shards with pairs, bounds that do not run from 0 to
    num_pairs or that decrease, and index arrays of the wrong width all raise before any read."""
    st_, ln = np.zeros((3, 2), dtype=np.int64), np.ones((3, 2), dtype=np.int64)
    nt, co = np.array([5], dtype=np.int64), np.zeros((8, 1), dtype=np.int64)
    idx, bounds = np.zeros(1, dtype=np.int64), np.array([0, 2], dtype=np.int64)
    assert native.take(idx, 2, bounds, (st_,), (ln,), nt, co) == 2
    with pytest.raises(ValueError, match="0 shards"):  # once read past an 8-byte bounds buffer
        native.take(idx, 2, np.zeros(1, dtype=np.int64), (), (), np.zeros(0, dtype=np.int64), co)
    with pytest.raises(IndexError):  # no shards and no pairs: every index is out of range
        native.take(idx, 0, np.zeros(1, dtype=np.int64), (), (), np.zeros(0, dtype=np.int64), co)
    assert native.take(idx[:0], 0, np.zeros(1, dtype=np.int64), (), (), np.zeros(0, dtype=np.int64),
                       co[:, :0]) == 0
    bad = [(idx, 3, bounds, (st_,), (ln,), nt, co), (idx, -1, bounds, (st_,), (ln,), nt, co),
           (idx, 2, np.array([1, 2]), (st_,), (ln,), nt, co),
           (idx, 2, np.array([0, 3, 2]), (st_, st_), (ln, ln), np.array([5, 5]), co),
           (idx, 2, bounds, (st_,), (ln, ln), nt, co), (idx, 2, bounds, (st_,), (ln,), np.array([5, 5]), co),
           (idx, 2, bounds, (st_.astype(np.int32),), (ln,), nt, co), (idx.astype(np.int32), 2, bounds, (st_,), (ln,), nt, co),
           (idx, 2, bounds, (st_,), (ln,), nt, np.zeros((8, 2), dtype=np.int64)),
           (idx, 2, bounds, (st_,), (ln,), nt, np.zeros(64, dtype=np.uint8))]
    for args in bad:
        with pytest.raises(ValueError):
            native.take(*args)


def test_version_names_the_kernels_in_use() -> None:
    import subprocess
    import sys

    import pairpack

    def version(**env: str) -> str:
        return subprocess.run([sys.executable, "-m", "pairpack.cli", "--version"], capture_output=True, text=True,
                              env={**os.environ, **env}, check=True).stdout

    assert f"{'native' if native is not None else 'numpy'} kernels)" in version()
    assert "numpy kernels)" in version(PAIRPACK_NATIVE="0")
    assert pairpack.backend() == ("native" if native is not None else "numpy")
