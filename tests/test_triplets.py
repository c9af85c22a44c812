"""Invariants of ``Dataset.batch`` -> :class:`pairpack.Triplets` for any dataset and any indices.

Row ``b`` of a batch holds pair ``i = indices[b]`` (negative indices count from the end):
``preferred_seq[b] = prompt + chosen + pad``, ``unpreferred_seq[b] = prompt + rejected + pad``,
masks True exactly on ``[0, P)`` (prompt) and ``[0, P + C)`` / ``[0, P + R)`` (real tokens), all
computed from stored lengths, never by comparing ids with ``pad_id``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import pairpack

from .strategies import DatasetSpec, datasets_spec, scratch_dir

KWARGS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask")


def assert_batch(batch: pairpack.Triplets, spec: DatasetSpec, indices: list[int], multiple: int | None) -> None:
    """``batch`` is exactly what the invariants say for pairs ``indices`` of ``spec``."""
    n = len(spec.pairs)
    idx = [i + n if i < 0 else i for i in indices]
    b = len(idx)
    tensors = batch.as_kwargs()
    shapes = {t.shape for t in tensors.values()}
    assert len(shapes) == 1
    (shape,) = shapes
    assert batch.shape == tuple(shape) and len(batch) == b and shape[0] == b
    width = shape[1]
    for name in KWARGS[:2]:
        assert tensors[name].dtype == torch.int64
    for name in KWARGS[2:]:
        assert tensors[name].dtype == torch.bool
    for t in (batch.indices, batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths):
        assert t.dtype == torch.int64 and t.shape == (b,)

    # L = the longest of the 2B rows, rounded up to the multiple
    longest = max([len(spec.pairs[i][0]) + max(len(spec.pairs[i][1]), len(spec.pairs[i][2])) for i in idx],
                  default=0)
    want_l = -(-longest // multiple) * multiple if multiple else longest
    assert width == want_l

    assert batch.indices.tolist() == idx
    pos = np.arange(width)
    pad = spec.pad_id
    pref, unpref = batch.preferred_seq.numpy(), batch.unpreferred_seq.numpy()
    pm = batch.prompt_mask.numpy()
    cm, rm = batch.preferred_seq_mask.numpy(), batch.unpreferred_seq_mask.numpy()
    for row, i in enumerate(idx):
        p, c, r = spec.pairs[i]
        lp = len(p)
        assert (batch.prompt_lengths[row], batch.chosen_lengths[row], batch.rejected_lengths[row]) == \
            (lp, len(c), len(r))
        # prompt in [0, P) of both rows; completion next; pad_id after
        assert pref[row, :lp].tolist() == unpref[row, :lp].tolist() == p
        assert pref[row].tolist() == p + c + [pad] * (width - lp - len(c))
        assert unpref[row].tolist() == p + r + [pad] * (width - lp - len(r))
        # masks exact, from lengths
        assert np.array_equal(pm[row], pos < lp)
        assert np.array_equal(cm[row], pos < lp + len(c))
        assert np.array_equal(rm[row], pos < lp + len(r))
        # unpadding gives the pair back
        assert pref[row][cm[row]].tolist() == p + c and unpref[row][rm[row]].tolist() == p + r
        assert pref[row][pm[row]].tolist() == p
    # a prompt position is always a real position
    assert not (batch.prompt_mask & ~batch.preferred_seq_mask).any()
    assert not (batch.prompt_mask & ~batch.unpreferred_seq_mask).any()
    for name in spec.columns:
        col = batch.columns[name]
        assert col.shape == (b,)
        assert np.array_equal(col.numpy(), spec.column_array(name)[idx])


def _to_indices(raw: list[int], n: int) -> list[int]:
    """Map arbitrary ints onto valid indices in [-n, n) (so index lists need not depend on the
    drawn dataset, and explicit examples can name them)."""
    return [r % (2 * n) - n for r in raw]


_PAD_IS_REAL = DatasetSpec(pairs=[([5, 0], [0, 0], [7]), ([0], [5], [0, 0, 0])], pad_id=0, shard_bytes=8)
_ALL = list(range(40))  # with _to_indices: every pair, negative and positive, and repeats


@given(spec=datasets_spec(min_pairs=1, max_pairs=10),
       raw=st.lists(st.integers(-1000, 1000), max_size=16),  # repeats, any order, negative
       multiple=st.one_of(st.none(), st.sampled_from([1, 2, 8, 64])))
@example(spec=_PAD_IS_REAL, raw=_ALL, multiple=8)
@example(spec=DatasetSpec(pairs=[([65536, 1], [2], [65535, 3, 4])], pad_id=65535), raw=_ALL, multiple=None)
@example(spec=DatasetSpec(pairs=[([65536], [1], [2])], pad_id=65536), raw=[], multiple=None)  # was OverflowError
def test_batch_invariants(spec: DatasetSpec, raw: list[int], multiple: int | None, backend: str) -> None:
    indices = _to_indices(raw, len(spec.pairs))
    with scratch_dir() as d:
        ds = spec.write(Path(d) / "ds")
        batch = ds.batch(indices, pad_to_multiple_of=multiple, columns=sorted(spec.columns))
        assert_batch(batch, spec, indices, multiple)
        # numpy index arrays of any integer dtype give the same batch
        again = ds.batch(np.asarray(indices, dtype=np.int32), pad_to_multiple_of=multiple,
                         columns=sorted(spec.columns))
        for k in KWARGS:
            assert torch.equal(getattr(batch, k), getattr(again, k))


def test_masks_ignore_pad_id_inside_real_tokens(tmp_path: Path) -> None:
    """pad_id is a real token here (0 occurs in prompts and completions): masks follow lengths."""
    ds = _PAD_IS_REAL.write(tmp_path / "ds")
    batch = ds.batch([0, 1])
    assert batch.preferred_seq.tolist() == [[5, 0, 0, 0], [0, 5, 0, 0]]
    assert batch.preferred_seq_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.unpreferred_seq.tolist() == [[5, 0, 7, 0], [0, 0, 0, 0]]
    assert batch.unpreferred_seq_mask.tolist() == [[True, True, True, False], [True] * 4]
    assert batch.prompt_mask.tolist() == [[True, True, False, False], [True, False, False, False]]


@pytest.mark.parametrize("pad_id", [0, 65536, (1 << 32) - 1])
def test_empty_batch(tmp_path: Path, pad_id: int, backend: str) -> None:
    """Shrunk from test_batch_invariants: an empty batch of a uint32 dataset whose pad_id is
    >= 65536 raised OverflowError (the pad buffer defaulted to uint16)."""
    ds = DatasetSpec(pairs=[([1], [2], [3])], pad_id=pad_id).write(tmp_path / "ds")
    batch = ds.batch([], pad_to_multiple_of=8)
    assert batch.shape == (0, 0) and len(batch) == 0
    assert all(getattr(batch, k).shape == (0, 0) for k in KWARGS)


def test_batch_index_out_of_range(tmp_path: Path, backend: str) -> None:
    ds = DatasetSpec(pairs=[([1], [2], [3]), ([4], [5], [6])], shard_bytes=4).write(tmp_path / "ds")
    for bad in ([2], [-3], [0, 1, 2]):
        with pytest.raises(IndexError, match=rf"pair index {bad[-1]} out of range for 2 pairs"):
            ds.batch(bad)


def test_as_kwargs_match_dpo_forward(tmp_path: Path) -> None:
    dpo = pytest.importorskip("x_transformers.dpo")
    params = inspect.signature(dpo.DPO.forward).parameters
    names = [p for p in params if p != "self"]
    ds = DatasetSpec(pairs=[([1, 2], [3], [4, 5])]).write(tmp_path / "ds")
    kwargs = ds.batch([0]).as_kwargs()
    assert set(kwargs) == set(names)
    # the call binds: positional-or-keyword and keyword-only parameters all accept these names
    inspect.signature(dpo.DPO.forward).bind(object(), **kwargs)


def test_to_and_pin_memory_keep_values(tmp_path: Path) -> None:
    spec = DatasetSpec(pairs=[([1, 2], [3], [4, 5]), ([6], [7, 8, 9], [10])],
                       columns={"score": ("float32", [0.25, -2.0])})
    ds = spec.write(tmp_path / "ds")
    batch = ds.batch([1, 0, 1], columns=["score"])
    moved = [batch.to("cpu")]
    try:
        moved.append(batch.pin_memory())
    except RuntimeError as e:  # CPU-only torch builds have no page-locked memory
        if torch.cuda.is_available():
            raise
        print(f"pin_memory not supported here: {e}")
    if torch.cuda.is_available():
        moved.append(batch.to("cuda").to("cpu"))
    for m in moved:
        for f in ("indices", "prompt_lengths", "chosen_lengths", "rejected_lengths", *KWARGS):
            a, b = getattr(batch, f), getattr(m, f)
            assert a.dtype == b.dtype and torch.equal(a, b.cpu())
        assert torch.equal(m.columns["score"].cpu(), batch.columns["score"])
    if len(moved) > 1 and moved[1].preferred_seq.device.type == "cpu":
        assert moved[1].preferred_seq.is_pinned()
