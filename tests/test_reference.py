"""Reference log-prob cache: columns round trip, equality with a live reference, settings checks,
and atomic column updates (pairpack.reference, pairpack.write.columns.add_columns)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pairpack
from pairpack.write import writer as writer_mod
from pairpack.train.dpo import DPO
from pairpack.errors import StateError
from pairpack.train.reference import (
    REF_CHOSEN,
    REF_REJECTED,
    REFERENCE_COLUMNS,
    check_reference,
    model_hash,
    precompute_reference,
    reference_columns,
    reference_kwargs,
)
from pairpack.train.tinylm import TinyLM
from pairpack.write.writer import Writer
from pairpack.write.columns import add_columns

VOCAB = 40
PAD = 0


def _pairs(seed: int, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    prompt = None
    for i in range(n):
        if prompt is None or i % 3:  # some pairs share a prompt (stored once)
            prompt = rng.integers(1, VOCAB, rng.integers(1, 7)).tolist()
        out.append((prompt, rng.integers(1, VOCAB, rng.integers(1, 9)).tolist(),
                    rng.integers(1, VOCAB, rng.integers(1, 9)).tolist()))
    return out


def make_dataset(path, n: int = 23, seed: int = 0, shard_bytes: int = 60):
    """A dataset of ``n`` random pairs in several shards (tiny ``shard_bytes``)."""
    pairs = _pairs(seed, n)
    with Writer(path, vocab_size=VOCAB, pad_id=PAD, shard_bytes=shard_bytes) as w:
        for p, c, r in pairs:
            w.add(p, c, r)
    return pairs


def tiny_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(VOCAB, max_len=32, d_model=16, n_layers=1, n_heads=2)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def pair_logp(model, prompt, completion, reduction):
    """Independent per-pair log-prob: one unpadded row, explicit loop over completion targets."""
    seq = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]).double(), dim=-1)[0]
    terms = [logp[t - 1, seq[0, t]].item() for t in range(len(prompt), seq.shape[1])]
    return sum(terms) / (len(terms) if reduction == "mean" else 1)


@pytest.fixture
def ds_path(tmp_path):
    path = tmp_path / "ds"
    make_dataset(path)
    return path


# --- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cache_round_trip(ds_path, reduction):
    model = tiny_model()
    before = pairpack.open(ds_path)
    ds = precompute_reference(before, model, batch_size=4, reduction=reduction)
    assert len(before.manifest.shards) > 1  # the columns are split over shards
    assert ds.column_names == sorted(REFERENCE_COLUMNS)
    assert ds.verify() == []
    assert ds.fingerprint == before.fingerprint  # columns never change the pairs' identity
    chosen, rejected = ds.column(REF_CHOSEN), ds.column(REF_REJECTED)
    assert chosen.dtype == np.float32 and chosen.shape == (len(ds),)
    for i in range(len(ds)):
        p, c, r = (x.tolist() for x in ds[i])
        assert chosen[i] == pytest.approx(pair_logp(model, p, c, reduction), abs=2e-5, rel=1e-6)
        assert rejected[i] == pytest.approx(pair_logp(model, p, r, reduction), abs=2e-5, rel=1e-6)
    info = {c.name: c for c in ds.manifest.columns}
    attrs = info[REF_CHOSEN].attrs
    assert attrs == info[REF_REJECTED].attrs
    assert attrs["model_hash"] == model_hash(model)
    assert attrs["reduction"] == reduction
    assert attrs["max_length"] is None and attrs["dataset_fingerprint"] == ds.fingerprint
    # the columns travel with batches and the whole-cache accessor agrees
    b = ds.batch([5, 0, 17], columns=REFERENCE_COLUMNS)
    kw = reference_kwargs(b)
    assert torch.equal(kw["ref_chosen_logp"], torch.from_numpy(chosen[[5, 0, 17]].copy()))
    tc, tr = reference_columns(ds, reduction=reduction, model_hash=model_hash(model))
    assert torch.equal(tc, torch.from_numpy(np.array(chosen))) and torch.equal(tr, torch.from_numpy(np.array(rejected)))
    # the model's mode is restored
    assert model.training


@pytest.fixture(scope="module")
def cached_datasets(tmp_path_factory):
    """reduction -> (dataset with a cache made by tiny_model(0), that model): built once."""
    out = {}
    for reduction in ("sum", "mean"):
        path = tmp_path_factory.mktemp("eq") / "ds"
        make_dataset(path, n=31, seed=5)
        ref = tiny_model(0)
        out[reduction] = (precompute_reference(path, ref, batch_size=5, reduction=reduction), ref)
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@given(seed=st.integers(0, 2**16), size=st.integers(1, 31), scale=st.sampled_from([0.0, 0.01, 0.3]))
def test_dpo_with_cache_equals_dpo_with_reference_model(cached_datasets, reduction, seed, size, scale):
    ds, ref = cached_datasets[reduction]
    policy = tiny_model(0)
    perturb(policy, seed, scale)
    live = DPO(policy, reduction=reduction, ref_model=ref)
    cached = DPO(policy, reduction=reduction, ref_model=False)
    # other batches than the cache's: other pairs together, other padded lengths, any order
    idx = np.random.default_rng(seed).choice(len(ds), size, replace=False)
    b = ds.batch(idx, columns=REFERENCE_COLUMNS)
    loss_live, m_live = live(**b.as_kwargs(), return_metrics=True)
    loss_cached, m_cached = cached(**b.as_kwargs(), **reference_kwargs(b), return_metrics=True)
    assert abs(loss_live.item() - loss_cached.item()) <= 1e-6
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(m_live[k].item() - m_cached[k].item()) <= 1e-6


def test_policy_equal_to_cached_reference_gives_ln2_exactly(ds_path):
    """Same batches as the cache: the policy's log-probs equal the cached ones bit for bit."""
    model = tiny_model(3)
    ds = precompute_reference(ds_path, model, batch_size=6, reduction="sum")
    dpo = DPO(model, reduction="sum", ref_model=False)
    model.eval()
    with torch.no_grad():
        for a in range(0, len(ds), 6):
            b = ds.batch(np.arange(a, min(a + 6, len(ds))), columns=REFERENCE_COLUMNS)
            loss, m = dpo(**b.as_kwargs(), **reference_kwargs(b), return_metrics=True)
            assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
            assert m["rewards/margins"].item() == 0.0 and m["rewards/accuracies"].item() == 0.0


def test_truncated_cache_matches_the_loaders_batches(tmp_path):
    path = tmp_path / "ds"
    make_dataset(path, n=30, seed=4)
    ref = tiny_model(1)
    ds = precompute_reference(path, ref, batch_size=7, reduction="sum", max_length=6, truncation="keep_end")
    attrs = check_reference(ds, reduction="sum", max_length=6)
    assert attrs["max_length"] == 6 and attrs["truncation"] == "keep_end"
    from pairpack.batch.options import Truncation
    from pairpack.batch.plan import make_plan

    idx = np.arange(len(ds))
    b = make_plan(ds, idx, truncation=Truncation(6), columns=REFERENCE_COLUMNS).assemble(ds.pad_id)
    assert b.shape[1] <= 6
    live = DPO(ref, reduction="sum")  # policy = deep copy of the reference
    loss_live = live(**b.as_kwargs())
    cached = DPO(ref, reduction="sum", ref_model=False)
    loss_cached = cached(**b.as_kwargs(), **reference_kwargs(b))
    assert abs(loss_live.item() - loss_cached.item()) <= 1e-6
    # a cache of untruncated pairs differs: truncation is really applied
    full = precompute_reference(path, ref, batch_size=7, reduction="sum")
    assert not np.array_equal(full.column(REF_CHOSEN), ds.column(REF_CHOSEN))


# --- settings checks -----------------------------------------------------------------------------
def test_mismatched_settings_raise_state_error(ds_path, tmp_path):
    ds0 = pairpack.open(ds_path)
    with pytest.raises(StateError, match="no cached reference"):
        check_reference(ds0, reduction="mean")
    model = tiny_model()
    ds = precompute_reference(ds_path, model, batch_size=8, reduction="mean")
    check_reference(ds, reduction="mean", model_hash=model_hash(model))  # matching: no error
    with pytest.raises(StateError, match="reduction='mean'.*reduction='sum'"):
        check_reference(ds, reduction="sum")
    with pytest.raises(StateError, match="max_length=None.*max_length=128"):
        check_reference(ds, reduction="mean", max_length=128)
    other = tiny_model(1)
    with pytest.raises(StateError, match="model_hash"):
        check_reference(ds, reduction="mean", model_hash=model_hash(other))
    with pytest.raises(StateError, match="model_hash"):
        reference_columns(ds, reduction="mean", model_hash=model_hash(other))
    t = precompute_reference(ds_path, model, batch_size=8, reduction="mean", max_length=8)
    with pytest.raises(StateError, match="truncation='keep_end'.*truncation='keep_start'"):
        check_reference(t, reduction="mean", max_length=8, truncation="keep_start")
    with pytest.raises(StateError, match="min_completion_tokens"):
        check_reference(t, reduction="mean", max_length=8, min_completion_tokens=2)
    # a cache copied onto another dataset (same number of pairs, other tokens) is refused
    other_path = tmp_path / "other"
    make_dataset(other_path, seed=9)
    attrs = {c.name: c.attrs for c in t.manifest.columns}
    add_columns(other_path, {k: t.column(k) for k in REFERENCE_COLUMNS},
                info={k: {"attrs": attrs[k]} for k in REFERENCE_COLUMNS})
    with pytest.raises(StateError, match="another dataset"):
        check_reference(pairpack.open(other_path), reduction="mean", max_length=8)
    # columns of those names not written by precompute_reference
    add_columns(other_path, {k: np.zeros(len(t), np.float32) for k in REFERENCE_COLUMNS})
    with pytest.raises(StateError, match="not written together"):
        check_reference(pairpack.open(other_path), reduction="mean")
    with pytest.raises(StateError, match="columns=pairpack.reference.REFERENCE_COLUMNS"):
        reference_kwargs(ds.batch([0, 1]))


def test_model_hash_identifies_weights():
    a, b = tiny_model(0), tiny_model(0)
    assert model_hash(a) == model_hash(b) and len(model_hash(a)) == 32
    perturb(b, 1, scale=1e-6)
    assert model_hash(a) != model_hash(b)
    assert model_hash(a.to(torch.bfloat16)) != model_hash(tiny_model(0))  # dtype is part of it


def test_bad_arguments(ds_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="reduction"):
        precompute_reference(ds_path, model, reduction="avg")
    with pytest.raises(ValueError, match="batch_size"):
        precompute_reference(ds_path, model, batch_size=0)
    with pytest.raises(ValueError, match="truncation"):
        precompute_reference(ds_path, model, max_length=8, truncation="middle")
    assert pairpack.open(ds_path).column_names == []  # nothing was written


# --- add_columns: atomic, checksummed, replaces old files ----------------------------------------
def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _referenced(root):
    m = json.loads((root / "manifest.json").read_text())
    return sorted([e["path"] for s in m["shards"] for e in list(s["files"].values()) + list(s["columns"].values())])


def test_replacing_a_cache_replaces_its_files(ds_path):
    model = tiny_model()
    ds1 = precompute_reference(ds_path, model, batch_size=8, reduction="sum")
    old_values = np.array(ds1.column(REF_CHOSEN))
    perturb(model, 2, scale=0.5)
    ds2 = precompute_reference(ds_path, model, batch_size=8, reduction="sum")
    assert ds2.verify() == []
    assert _files(ds_path) == sorted(["manifest.json"] + _referenced(ds_path))  # no stale files
    assert not np.array_equal(ds2.column(REF_CHOSEN), old_values)
    assert np.array_equal(ds1.column(REF_CHOSEN), old_values)  # an open dataset keeps its old view
    assert {c.attrs["model_hash"] for c in ds2.manifest.columns} == {model_hash(model)}


def test_add_columns_replaces_writer_columns_and_keeps_others(tmp_path):
    path = tmp_path / "ds"
    with Writer(path, vocab_size=VOCAB, pad_id=PAD, shard_bytes=40, columns={"score": "float32"},
                column_info={"score": {"description": "s", "attrs": {"v": 1}}}) as w:
        for i, (p, c, r) in enumerate(_pairs(1, 9)):
            w.add(p, c, r, score=float(i))
    add_columns(path, {"weight": np.arange(9, dtype=np.int64)}, info={"weight": {"description": "w"}})
    ds = pairpack.open(path)
    assert ds.column_names == ["score", "weight"] and ds.verify() == []
    assert ds.column("score").tolist() == list(range(9))  # untouched, attrs kept
    assert {c.name: c.attrs for c in ds.manifest.columns}["score"] == {"v": 1}
    add_columns(path, {"score": torch.arange(9, dtype=torch.float64) * 2})  # a tensor, another dtype
    ds = pairpack.open(path)
    assert ds.column("score").dtype == np.float64 and ds.column("score").tolist() == [2.0 * i for i in range(9)]
    assert {c.name: c.attrs for c in ds.manifest.columns}["score"] == {}  # old attrs never describe new values
    assert ds.verify() == [] and _files(path) == sorted(["manifest.json"] + _referenced(path))
    assert not list(path.rglob("score.npy"))  # the writer's file was deleted after the swap


@pytest.mark.parametrize("values, match", [
    (np.zeros(8, np.float32), "shape"),
    (np.zeros(9, np.float16), "dtype"),
    (np.array([0.0] * 8 + [np.inf], np.float32), "non-finite"),
    (np.array(["a"] * 9), "dtype"),
])
def test_add_columns_refuses_bad_values(tmp_path, values, match):
    path = tmp_path / "ds"
    make_dataset(path, n=9)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=match):
        add_columns(path, {"x": values})
    with pytest.raises(ValueError, match="bad column name"):
        add_columns(path, {"Bad-Name": np.zeros(9, np.float32)})
    with pytest.raises(ValueError, match="JSON"):
        add_columns(path, {"x": np.zeros(9, np.float32)}, info={"x": {"attrs": {"f": object()}}})
    with pytest.raises(ValueError, match="not being added"):
        add_columns(path, {"x": np.zeros(9, np.float32)}, info={"y": {}})
    assert (path / "manifest.json").read_bytes() == before
    assert _files(path) == sorted(["manifest.json"] + _referenced(path))


def test_failure_before_the_manifest_swap_leaves_the_dataset_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "ds"
    make_dataset(path)
    add_columns(path, {"x": np.ones(23, np.float32)})
    before_manifest = (path / "manifest.json").read_bytes()
    before_files = _files(path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash at the commit point")
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        add_columns(path, {"x": np.zeros(23, np.float32), "y": np.ones(23, np.float32)})
    monkeypatch.setattr(writer_mod.os, "replace", real_replace)
    assert (path / "manifest.json").read_bytes() == before_manifest
    assert _files(path) == before_files  # the new files were removed again
    ds = pairpack.open(path)
    assert ds.verify() == [] and ds.column("x").tolist() == [1.0] * 23


def test_leftovers_of_a_killed_update_are_collected(tmp_path):
    """A process killed after writing column files but before the swap leaves unreferenced files;
    the dataset stays sound and the next update removes them."""
    path = tmp_path / "ds"
    make_dataset(path, n=9)
    code = (
        "import os, sys, numpy as np\n"
        "from pairpack.write import columns\n"
        "real = os.replace\n"
        "def die(src, dst):\n"
        "    if str(dst).endswith('manifest.json'):\n"
        "        os._exit(9)\n"
        "    return real(src, dst)\n"
        "columns.os.replace = die\n"
        f"columns.add_columns({str(path)!r}, {{'x': np.ones(9, np.float32)}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(pairpack.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
    assert proc.returncode == 9
    ds = pairpack.open(path)
    assert ds.column_names == [] and ds.verify() == []
    assert len(_files(path)) > len(_referenced(path)) + 1  # leftovers: column files and a temp manifest
    add_columns(path, {"y": np.ones(9, np.float32)})
    assert _files(path) == sorted(["manifest.json"] + _referenced(path))
    assert pairpack.open(path).verify() == []


def test_loader_delivers_the_cache_and_check_loader_guards_the_settings(tmp_path):
    from pairpack.train.reference import check_loader

    path = tmp_path / "ds"
    make_dataset(path, n=30, seed=6)
    ref = tiny_model(2)
    ds = precompute_reference(path, ref, batch_size=4, reduction="mean", max_length=7)
    loader = pairpack.Loader(ds, batch_size=5, shuffle=True, seed=1, max_length=7, columns=REFERENCE_COLUMNS)
    policy = tiny_model(2)
    perturb(policy, 3, scale=0.2)
    cached = DPO(policy, reduction="mean", ref_model=False)
    live = DPO(policy, reduction="mean", ref_model=ref)
    check_loader(loader, cached, model_hash=model_hash(ref))
    seen = 0
    for batch in loader:  # truncated batches: the cache scores exactly the tokens the policy sees
        assert batch.shape[1] <= 7
        a = cached(**batch.as_kwargs(), **reference_kwargs(batch)).item()
        b = live(**batch.as_kwargs()).item()
        assert abs(a - b) <= 1e-6
        seen += len(batch)
    assert seen == loader.counts["used"] and loader.counts["truncated"] > 0
    with pytest.raises(StateError, match="max_length=7.*max_length=None"):
        check_loader(pairpack.Loader(ds, batch_size=5, columns=REFERENCE_COLUMNS), cached)
    with pytest.raises(StateError, match="does not deliver"):
        check_loader(pairpack.Loader(ds, batch_size=5, max_length=7), cached)
    with pytest.raises(StateError, match="ref_model=False"):
        check_loader(loader, live)
    with pytest.raises(StateError, match="reduction"):
        check_loader(loader, DPO(policy, reduction="sum", ref_model=False))
