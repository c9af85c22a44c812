"""DeviceFeeder (pairpack/cuda.py): exactness against ``assemble``, the ring's buffer discipline, errors.

CPU tests run the whole feeder (ring, host gather, the same expansion function as on the GPU) on
``device="cpu"``, and the ring logic on a fake engine whose "DMA" and "kernels" run only when an
event is waited on, so a buffer rewritten before its copy ran shows up as a wrong batch. Tests
marked ``cuda`` run on a GPU only (tests/conftest.py skips them elsewhere).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

from pairpack.batch.options import Truncation
from pairpack.batch.plan import BatchPlan
from pairpack.batch.cuda import DeviceFeeder, _Engine, expand, layout_for, write_host
from pairpack.errors import DeviceError, PairpackError
from pairpack.batch.triplets import Triplets, assemble

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask",
          "indices", "prompt_lengths", "chosen_lengths", "rejected_lengths")


# --- helpers -----------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)


def assert_same(got: Triplets, ref: Triplets) -> None:
    """Bit-for-bit equality of every tensor, with dtypes and shapes."""
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), f
    assert got.columns.keys() == ref.columns.keys()
    for k in ref.columns:
        a, b = got.columns[k], ref.columns[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)), k


def reference(plan: BatchPlan, pad_id: int, mult: int | None) -> Triplets:
    return assemble(*plan.args(), pad_id=pad_id, pad_to_multiple_of=mult, indices=plan.indices,
                    columns=plan.columns)


def random_plan(rng: np.random.Generator, shards: list[np.ndarray], b: int, max_len: int,
                columns: bool = True) -> BatchPlan:
    """A plan of ``b`` pairs whose segments are random slices of random shards (lengths may be 0)."""
    which = rng.integers(0, len(shards), b)
    tokens = [shards[k] for k in which.tolist()]
    sizes = np.array([len(shards[k]) for k in which.tolist()], dtype=np.int64)
    p = rng.integers(0, max_len + 1, b)
    c = rng.integers(0, max_len + 1, (2, b))
    ps = (rng.random(b) * (sizes - p + 1)).astype(np.int64)
    cs = (rng.random((2, b)) * (sizes - c + 1)).astype(np.int64)
    cols = {"score": rng.standard_normal(b).astype(np.float32), "ref": rng.standard_normal(b),
            "n32": rng.integers(-2**31, 2**31, b).astype(np.int32)} if columns else {}
    return BatchPlan(tokens, ps, p, cs, c, rng.integers(0, 10**9, b), cols)


def shards_for(rng: np.random.Generator, dtype: Any, n: int = 3, size: int = 4000) -> list[np.ndarray]:
    hi = np.iinfo(dtype).max
    out = []
    for _ in range(n):
        a = rng.integers(0, hi, size, endpoint=True, dtype=np.uint64).astype(dtype)
        a[rng.integers(0, size, 50)] = hi  # the largest id: sign-extension bugs show here
        out.append(a)
    return out


# --- exactness on CPU (the expansion that runs on the GPU, run on CPU tensors) ----------------------
@st.composite
def plans(draw: Any) -> tuple[BatchPlan, int, int | None]:
    dtype = draw(st.sampled_from([np.uint16, np.uint32]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shards = shards_for(rng, dtype, n=draw(st.integers(1, 3)), size=draw(st.integers(1, 600)))
    b = draw(st.integers(0, 12))
    max_len = draw(st.integers(0, 300))
    plan = random_plan(rng, shards, b, min(max_len, min(len(s) for s in shards)),
                       columns=draw(st.booleans()))
    hi = int(np.iinfo(dtype).max)
    pad_id = draw(st.sampled_from([0, 1, hi, hi - 1, 32768 if dtype == np.uint16 else 2**31]))
    mult = draw(st.sampled_from([None, 1, 3, 8, 64]))
    return plan, pad_id, mult


def _plan1(dtype: Any, p: list[int], c: list[int], r: list[int], fill: int) -> BatchPlan:
    tok = np.full(1000, fill, dtype=dtype)
    tok[::7] = 3
    b = len(p)
    return BatchPlan([tok] * b, np.arange(b, dtype=np.int64), np.array(p, dtype=np.int64),
                     np.stack([np.arange(b) + 100, np.arange(b) + 200]).astype(np.int64),
                     np.array([c, r], dtype=np.int64), np.arange(b, dtype=np.int64), {})


@given(plans(), st.sampled_from(["compact", "padded", "padded-host-widen"]))
@example((_plan1(np.uint16, [0], [0], [0], 65535), 65535, None), "compact")  # empty rows, L = 0
@example((_plan1(np.uint16, [3, 1], [2, 0], [0, 5], 65535), 65535, 4), "compact")
@example((_plan1(np.uint32, [2], [1], [4], 2**32 - 1), 2**32 - 1, None), "padded")
@example((BatchPlan([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((2, 0), np.int64),
                    np.zeros((2, 0), np.int64), np.zeros(0, np.int64), {}), 7, 8), "compact")  # B = 0
def test_host_gather_then_expand_equals_assemble(backend, case, mode):
    plan, pad_id, mult = case
    compact, widen = mode == "compact", mode == "padded-host-widen"
    lay = layout_for(plan, compact=compact, pad_to_multiple_of=mult, host_widen=widen)
    buf = np.full(lay.nbytes + 128, 0xA5, dtype=np.uint8)  # poisoned: every used byte must be written
    write_host(plan, lay, buf, pad_id=pad_id)
    got = expand(torch.from_numpy(buf), lay)
    assert_same(got, reference(plan, pad_id, mult))


@pytest.mark.parametrize("compact", [True, False])
def test_expand_on_memory_maps_of_uint32_data(tmp_path, compact):
    rng = np.random.default_rng(1)
    paths = []
    for k, dt in enumerate([np.uint32, np.uint32]):
        np.save(tmp_path / f"t{k}.npy", shards_for(rng, dt, n=1, size=5000)[0])
        paths.append(np.load(tmp_path / f"t{k}.npy", mmap_mode="r"))
    feeder = DeviceFeeder("cpu", pad_id=2**32 - 1, pad_to_multiple_of=16, compact=compact, prefetch=3)
    for _ in range(20):
        plan = random_plan(rng, paths, int(rng.integers(1, 40)), 700)
        feeder.submit(plan)
        assert_same(feeder.get(), reference(plan, 2**32 - 1, 16))
    feeder.close()


def test_layout_sizes_compact_sends_each_stored_token_once():
    rng = np.random.default_rng(2)
    plan = random_plan(rng, shards_for(rng, np.uint16), 32, 500)
    p, c = plan.prompt_lengths, plan.completion_lengths
    n = int((p + c).max())
    lays = {m: layout_for(plan, compact=m == "c", host_widen=m == "w") for m in "cpw"}
    assert lays["c"].tok_count == int(p.sum() + c.sum()) + 1  # each prompt once, plus one pad_id
    assert lays["c"].tok_dtype == np.uint16 and lays["p"].tok_dtype == np.uint16
    assert lays["p"].tok_count == lays["w"].tok_count == 2 * 32 * n
    assert lays["w"].tok_dtype == np.int64
    assert lays["c"].nbytes < lays["p"].nbytes < lays["w"].nbytes


# --- the ring, on a fake engine with a lazy queue ----------------------------------------------------
class _LazyFuture:
    def __init__(self) -> None:
        self.ran, self.value = False, None

    def result(self) -> Any:
        if not self.ran:
            raise AssertionError("device work read before it ran")
        return self.value


class _LazyEvent:
    def __init__(self, eng: "LazyEngine", mark: int, honest: bool) -> None:
        self.eng, self.mark, self.honest = eng, mark, honest

    def query(self) -> bool:
        return self.eng.done >= self.mark

    def synchronize(self) -> None:
        self.eng.log.append(("wait", self.mark))
        if self.honest:
            self.eng.run_until(self.mark)


class LazyEngine(_Engine):
    """A device whose queue (copies and expansions) runs only when an event is waited on.

    With ``honest=False`` waiting on an event does nothing (as if a feeder skipped its waits):
    the queue only runs at hand-over, after the host has rewritten the buffers.
    """

    def __init__(self, honest: bool = True) -> None:
        super().__init__(torch.device("cpu"))
        self.queue: list[tuple[Callable[[], Any], _LazyFuture]] = []
        self.done = 0
        self.log: list[tuple[str, int]] = []
        self.buffers: list[torch.Tensor] = []
        self.honest = honest

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        buf = super().host_buffer(nbytes)
        self.buffers.append(buf)
        return buf

    def enqueue(self, fn: Callable[[], Any]) -> _LazyFuture:
        fut = _LazyFuture()
        self.queue.append((fn, fut))
        return fut

    def record(self) -> _LazyEvent:
        return _LazyEvent(self, len(self.queue), self.honest)

    def run_until(self, mark: int) -> None:
        while self.done < mark:
            fn, fut = self.queue[self.done]
            fut.value, fut.ran = fn(), True
            self.done += 1

    def hand_over(self, ready: Any, fut: Any, one_storage: bool = False) -> Triplets:
        self.log.append(("hand_over", ready.mark))
        self.run_until(ready.mark)
        return fut.result()


def _ring_plans(n: int, seed: int = 3, max_len: int = 200) -> list[BatchPlan]:
    rng = np.random.default_rng(seed)
    shards = shards_for(rng, np.uint16)
    return [random_plan(rng, shards, int(rng.integers(1, 30)), max_len) for _ in range(n)]


@pytest.mark.parametrize("mode", ["compact", "padded", "host-widened"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_ring_reuses_a_buffer_only_after_its_copy_ran(mode, prefetch):
    eng = LazyEngine()
    feeder = DeviceFeeder(pad_id=9, compact=mode == "compact", host_widen=mode == "host-widened", prefetch=prefetch,
                          _engine=eng)
    plans = _ring_plans(12)
    refs = [reference(p, 9, None) for p in plans]
    got = []
    for i, plan in enumerate(plans):
        feeder.submit(plan)  # all `prefetch` slots hold pending copies after the first rounds
        if feeder.pending > prefetch:  # deliberately keep more batches pending than slots
            got.append(feeder.get())
    while feeder.pending:
        got.append(feeder.get())
    for g, r in zip(got, refs, strict=True):  # in submission order, and uncorrupted
        assert_same(g, r)
    waits = [m for kind, m in eng.log if kind == "wait"]
    assert len(waits) == len(plans) - prefetch  # one wait per reuse of a slot, on that slot's copy
    assert eng.done == len(eng.queue)
    feeder.close()


@pytest.mark.parametrize("mode", ["compact", "host-widened"])
def test_ring_test_detects_a_feeder_that_does_not_wait(mode):
    # negative control for the test above: when waits do nothing, copies read rewritten buffers
    feeder = DeviceFeeder(pad_id=9, compact=mode == "compact", host_widen=mode == "host-widened", prefetch=2,
                          _engine=LazyEngine(honest=False))
    plans = _ring_plans(6, max_len=60)
    for plan in plans:
        feeder.submit(plan)
    bad = 0
    for plan in plans:
        try:
            assert_same(feeder.get(), reference(plan, 9, None))
        except (AssertionError, RuntimeError, IndexError):
            bad += 1
    assert bad >= len(plans) - 2


def test_ring_allocates_once_and_grows_only_when_needed():
    eng = LazyEngine()
    feeder = DeviceFeeder(pad_id=0, compact=False, host_widen=False, prefetch=2, _engine=eng)
    rng = np.random.default_rng(4)
    shards = shards_for(rng, np.uint16, size=20000)
    small = [random_plan(rng, shards, 4, 50) for _ in range(8)]
    for plan in small:
        feeder.submit(plan)
        feeder.get()
    assert feeder.host_allocations == 2 and len(eng.buffers) == 2  # one per slot, then reused
    ptrs = [b.data_ptr() for b in eng.buffers]
    big = random_plan(rng, shards, 40, 4000)  # > MIN_BUFFER bytes of padded rows
    assert layout_for(big, compact=False).nbytes > eng.buffers[0].numel()
    refs = []
    for plan in [big, *small[:3]]:
        feeder.submit(plan)
        refs.append((feeder.get(), reference(plan, 0, None)))
    assert feeder.host_allocations == 3  # only the slot that took the big batch grew
    assert eng.buffers[2].numel() >= layout_for(big, compact=False).nbytes
    assert eng.buffers[2].numel() & (eng.buffers[2].numel() - 1) == 0  # power of two
    assert ptrs[1] == eng.buffers[1].data_ptr()
    for g, r in refs:
        assert_same(g, r)


def test_returned_batches_stay_valid_while_held():
    feeder = DeviceFeeder("cpu", pad_id=5, prefetch=2)
    plans = _ring_plans(10)
    held = []
    for plan in plans:
        feeder.submit(plan)
        held.append(feeder.get())
    for g, plan in zip(held, plans):  # later batches reused the ring: earlier ones are untouched
        assert_same(g, reference(plan, 5, None))


def test_cpu_feeder_with_a_real_dataset_and_columns(tmp_path):
    import pairpack
    from pairpack.batch.plan import make_plan

    rng = np.random.default_rng(5)
    with pairpack.Writer(tmp_path / "ds", vocab_size=70000, pad_id=69999, columns={"score": "float32"}) as w:
        for _ in range(60):
            w.add(rng.integers(0, 70000, int(rng.integers(1, 40))).tolist(),
                  rng.integers(0, 70000, int(rng.integers(1, 30))).tolist(),
                  rng.integers(0, 70000, int(rng.integers(1, 30))).tolist(), score=float(rng.random()))
    ds = pairpack.open(tmp_path / "ds")
    assert ds.lengths.shape == (3, 60)
    for compact, widen in ((True, False), (False, False), (False, True)):
        with DeviceFeeder("cpu", pad_id=ds.pad_id, pad_to_multiple_of=8, compact=compact, host_widen=widen) as feeder:
            for max_length in (None, 40, 12):
                idx = rng.permutation(60)[:13]
                plan = make_plan(ds, idx, truncation=Truncation(max_length), columns=["score"])
                feeder.submit(plan)
                got = feeder.get()
                assert_same(got, reference(plan, ds.pad_id, 8))
                if max_length is None:
                    assert_same(got, ds.batch(idx, pad_to_multiple_of=8, columns=["score"]))


# --- errors ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_raises_a_clear_error(device):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        DeviceFeeder(device, pad_id=0)


def test_misuse_raises_pairpack_errors():
    with pytest.raises(DeviceError, match="not supported"):
        DeviceFeeder("meta", pad_id=0)
    with pytest.raises(ValueError, match="prefetch"):
        DeviceFeeder("cpu", pad_id=0, prefetch=0)
    feeder = DeviceFeeder(None, pad_id=0)
    assert feeder.device == torch.device("cpu") and feeder.stream is None
    with pytest.raises(DeviceError, match="no batch submitted"):
        feeder.get()
    feeder.submit(_ring_plans(1)[0])
    feeder.close()
    feeder.close()  # idempotent
    with pytest.raises(PairpackError, match="closed"):
        feeder.submit(_ring_plans(1)[0])
    with pytest.raises(DeviceError, match="closed"):
        feeder.get()


def test_unsupported_token_dtype_is_reported():
    tok = np.arange(100, dtype=">u2")  # big-endian: a device view would read swapped bytes
    plan = BatchPlan([tok], np.array([0]), np.array([3]), np.array([[5], [9]]), np.array([[2], [2]]),
                     np.array([0]), {})
    with pytest.raises(DeviceError, match="dtype"):
        DeviceFeeder("cpu", pad_id=0).submit(plan)


# --- the benchmark script works (CPU smoke) --------------------------------------------------------------
def test_gpu_check_cpu_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exactness" in res.stdout and "PASS" in res.stdout and "FAIL" not in res.stdout
    for row in ("usual path", "feeder compact", "feeder padded"):
        assert row in res.stdout


# --- CUDA (skipped without a GPU) -------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["compact", "padded", "padded-host-widen"])
def test_cuda_batches_equal_the_cpu_path(mode):
    rng = np.random.default_rng(6)
    feeder = DeviceFeeder("cuda", pad_id=65535, pad_to_multiple_of=8, compact=mode == "compact",
                          host_widen=mode == "padded-host-widen", prefetch=2)
    for dt in (np.uint16, np.uint32):
        shards = shards_for(rng, dt, size=20000)
        plans = [random_plan(rng, shards, int(rng.integers(0, 40)), 900) for _ in range(40)]
        got = []
        for i, plan in enumerate(plans):
            feeder.submit(plan)
            if feeder.pending > 1:
                got.append(feeder.get())
        while feeder.pending:
            got.append(feeder.get())
        for g, plan in zip(got, plans, strict=True):
            assert g.preferred_seq.device.type == "cuda"
            assert_same(g, reference(plan, 65535, 8))
    feeder.close()


@pytest.mark.cuda
def test_cuda_submit_and_get_never_synchronize_implicitly():
    rng = np.random.default_rng(7)
    plans = [random_plan(rng, shards_for(rng, np.uint16), 16, 300) for _ in range(8)]
    for compact in (True, False):
        feeder = DeviceFeeder("cuda", pad_id=0, compact=compact, host_widen=False, prefetch=2)
        feeder.submit(plans[0])
        feeder.get()  # buffers allocated (pinned allocation is outside the check)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for plan in plans:
                    feeder.submit(plan)
                    out = feeder.get()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert_same(out, reference(plans[-1], 0, None))
        feeder.close()


@pytest.mark.cuda
def test_cuda_consumer_on_a_side_stream_sees_complete_batches():
    rng = np.random.default_rng(8)
    plans = [random_plan(rng, shards_for(rng, np.uint32, size=30000), 32, 2000) for _ in range(6)]
    feeder = DeviceFeeder("cuda", pad_id=1, prefetch=2)
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(side):
        for plan in plans:
            torch.mm(a, a)  # keep the side stream busy while the copies run
            feeder.submit(plan)
            out = feeder.get()
            s = out.preferred_seq.sum() + out.unpreferred_seq.sum()  # used on the side stream
            ref = reference(plan, 1, None)
            assert int(s) == int(ref.preferred_seq.sum() + ref.unpreferred_seq.sum())
    feeder.close()


# --- through the Loader ------------------------------------------------------------------------------------
def _loader_dataset(tmp_path: Path) -> Path:
    import pairpack

    rng = np.random.default_rng(9)
    with pairpack.Writer(tmp_path / "lds", vocab_size=1000, pad_id=999) as w:
        for _ in range(50):
            w.add(*(rng.integers(0, 999, int(rng.integers(1, 30))).tolist() for _ in range(3)))
    return tmp_path / "lds"


def test_loader_device_path_runs_the_feeder_on_cpu(tmp_path):
    # the Loader sends plans to its feeder only for a non-CPU device; swap the feeder class in to
    # run that path (submission ahead, get, close) here, against the Loader's own CPU batches
    from pairpack.batch.loader import Loader

    path = _loader_dataset(tmp_path)
    plain = list(Loader(path, batch_size=7, seed=3, max_length=20, pad_to_multiple_of=4))
    for compact in (True, False):
        loader = Loader(path, batch_size=7, seed=3, max_length=20, pad_to_multiple_of=4, compact=compact)
        if not hasattr(loader, "_feeder_cls"):
            pytest.skip("the Loader's device hook changed")
        loader._feeder_cls = DeviceFeeder
        got = list(loader)
        assert len(got) == len(plain)
        for g, r in zip(got, plain):
            assert_same(g, r)


@pytest.mark.cuda
def test_loader_on_cuda_equals_the_cpu_loader(tmp_path):
    from pairpack.batch.loader import Loader

    path = _loader_dataset(tmp_path)
    plain = list(Loader(path, batch_size=7, seed=3, max_length=20))
    for compact in (True, False):
        got = list(Loader(path, batch_size=7, seed=3, max_length=20, device="cuda", compact=compact))
        assert len(got) == len(plain)
        for g, r in zip(got, plain):
            assert g.preferred_seq.is_cuda
            assert_same(g, r)


def test_default_mode_is_host_widened_the_fastest_measured():
    """README's H200 table: host-widened beat padded and compact; it is the default of both entry points."""
    import inspect

    from pairpack.batch.loader import Loader

    assert DeviceFeeder(pad_id=0)._host_widen and not DeviceFeeder(pad_id=0).compact
    sig = inspect.signature(Loader.__init__).parameters
    assert sig["compact"].default is False and sig["host_widen"].default is True


def _same_packed(a, b) -> None:
    assert a.layout == b.layout and a.max_seqlen == b.max_seqlen and a.columns.keys() == b.columns.keys()
    for x, y in zip(a.tensors(), b.tensors()):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_feeder_carries_packed_layouts_through_its_ring(tmp_path, layout):
    """CPU engine, same code as CUDA minus the calls: a PackedBatch staged in a ring buffer comes
    back equal to the built batch, also when the slot is reused and grown, never aliasing it."""
    from pairpack.batch.layouts import build
    from pairpack.batch.options import PlanOptions
    from pairpack.batch.plan import make_plan

    import pairpack

    ds = pairpack.open(_loader_dataset(tmp_path))
    opts = PlanOptions(layout=layout, max_row_tokens=40, pad_to_multiple_of=8)
    rng = np.random.default_rng(2)
    with DeviceFeeder("cpu", pad_id=ds.pad_id, options=opts, prefetch=2) as feeder:
        got, want = [], []
        for size in (3, 30, 5, 30, 2):
            plan = make_plan(ds, rng.permutation(len(ds))[:size], truncation=Truncation(20))
            feeder.submit(plan)
            got.append(feeder.get())
            want.append(build(plan, ds.pad_id, opts))
        for g, w in zip(got, want):
            _same_packed(g, w)
    with pytest.raises(ValueError, match="not both"):
        DeviceFeeder("cpu", pad_id=0, options=opts, pad_to_multiple_of=8)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_loader_on_cuda_carries_packed_layouts(tmp_path, layout):
    from pairpack.batch.loader import Loader

    path = _loader_dataset(tmp_path)
    kw = dict(max_tokens=512, seed=3, max_length=20, layout=layout, max_row_tokens=64)
    plain = list(Loader(path, **kw))
    got = list(Loader(path, device="cuda", **kw))
    assert len(got) == len(plain)
    for g, r in zip(got, plain):
        assert g.input_ids.is_cuda
        _same_packed(g, r)
        torch.cuda.synchronize()
        bm = g.block_mask()  # FlexAttention block mask built on the GPU
        assert bm is not None
