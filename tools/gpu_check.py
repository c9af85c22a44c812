#!/usr/bin/env python3
"""One prepared GPU check of pairpack's DeviceFeeder (pairpack/cuda.py); no network, < 3 minutes.

    python tools/gpu_check.py               # on a GPU machine
    python tools/gpu_check.py --cpu-smoke   # tiny sizes on the CPU: checks that this script works
    python tools/gpu_check.py --device cpu  # full sizes on the CPU: host-side costs only

(1) Exactness: a few thousand batches (uint16 and uint32 data in memory maps, batch sizes and
    lengths varied, ``pad_to_multiple_of`` varied, columns carried) through the feeder in every
    transfer mode with the ring buffers reused and grown, each compared bit for bit with the CPU
    path ``assemble(...).to(device)``; some batches are held and re-checked at the end (validity
    while held). On CUDA also: submit/get under ``torch.cuda.set_sync_debug_mode("error")``.
(2) Throughput for batches of 32 pairs x up to 2048 tokens (uint16, vocab 50k), all paths on the
    same precomputed plans, in one run: the ceiling (torch's own pinned-tensor copy of the usual
    path's output bytes into a preallocated device tensor), the usual path (collate with
    ``assemble``, ``pin_memory()``, ``.to(device, non_blocking=True)``), and the feeder in compact,
    padded, and padded-widened-on-host modes. Batches/s delivered on the device, host CPU time per
    batch (process CPU time over the loop), ratios against the usual path and the ceiling.
(3) Overlap (CUDA only): a chain of large bf16 matmuls on the default stream, timed alone and then
    again while the feeder copies and expands batches on its own stream; reports whether all
    batches were ready before the matmuls ended, the matmul slowdown, and how long the host spent
    in submit() (never waiting for the default stream).

Prints one table; exits 1 if (1) fails, else 0 (targets of (2)/(3) are reported, not enforced).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pairpack.batch.plan import BatchPlan  # noqa: E402
from pairpack.batch.cuda import DeviceFeeder, layout_for, write_host  # noqa: E402
from pairpack.batch.triplets import Triplets, assemble  # noqa: E402

FIELDS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask",
          "indices", "prompt_lengths", "chosen_lengths", "rejected_lengths")
MODES = {  # name -> DeviceFeeder keyword arguments
    "feeder compact": dict(compact=True),
    "feeder padded": dict(compact=False),
    "feeder padded, host-widened": dict(compact=False, host_widen=True),
}


@dataclass
class Sizes:
    exact_batches: int  # per dtype and mode
    exact_max_b: int
    exact_max_len: int
    tokens: int  # shard size for throughput
    batch: int
    max_half: int  # P, C, R drawn below this: rows up to 2 * max_half
    mult: int
    plans: int
    iters: int
    warmup: int
    overlap_batches: int
    matmul_ms: float


FULL = Sizes(700, 32, 1500, 40_000_000, 32, 1024, 64, 256, 600, 30, 48, 250.0)
SMOKE = Sizes(30, 6, 60, 200_000, 4, 32, 8, 8, 20, 3, 4, 5.0)


# --- helpers ---------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_zeros(0, dtype=torch.uint8)


def same(got: Triplets, ref: Triplets) -> bool:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or not torch.equal(bits(a), bits(b)):
            return False
    if got.columns.keys() != ref.columns.keys():
        return False
    return all(got.columns[k].dtype == ref.columns[k].dtype and torch.equal(bits(got.columns[k]), bits(ref.columns[k]))
               for k in ref.columns)


def out_bytes(t: Triplets) -> int:
    ts = [getattr(t, f) for f in FIELDS] + list(t.columns.values())
    return sum(x.numel() * x.element_size() for x in ts)


def mmap_shard(root: Path, name: str, arr: np.ndarray) -> np.ndarray:
    np.save(root / name, arr)
    return np.load(root / name, mmap_mode="r")


def lognormal_lengths(rng: np.random.Generator, shape: tuple[int, ...], median: float, cap: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), 0.8, shape).astype(np.int64), 1, cap)


def random_plan(rng: np.random.Generator, shards: list[np.ndarray], b: int, max_len: int) -> BatchPlan:
    which = rng.integers(0, len(shards), b)
    tokens = [shards[k] for k in which.tolist()]
    sizes = np.array([len(t) for t in tokens], dtype=np.int64)
    p = lognormal_lengths(rng, (b,), max_len / 6, max_len)
    c = lognormal_lengths(rng, (2, b), max_len / 5, max_len)
    ps = (rng.random(b) * (sizes - p)).astype(np.int64)
    cs = (rng.random((2, b)) * (sizes - c)).astype(np.int64)
    cols = {"score": rng.standard_normal(b).astype(np.float32), "n": rng.integers(-2**62, 2**62, b)}
    return BatchPlan(tokens, ps, p, cs, c, rng.integers(0, 2**40, b), cols)


# --- (1) exactness -------------------------------------------------------------------------------------
def check_exactness(dev: torch.device, z: Sizes, root: Path, rng: np.random.Generator) -> tuple[list[list[str]], bool]:
    rows, ok_all = [], True
    data = {}
    for dt in (np.uint16, np.uint32):
        hi = int(np.iinfo(dt).max)
        shards = []
        for k in range(2):
            a = rng.integers(0, hi, 300_000 if z is FULL else 20_000, endpoint=True, dtype=np.uint64).astype(dt)
            a[rng.integers(0, len(a), 1000)] = hi  # the largest ids catch sign-extension bugs
            shards.append(mmap_shard(root, f"exact-{np.dtype(dt).name}-{k}.npy", a))
        data[dt] = (shards, hi)
    for mode, kw in MODES.items():
        checked = bad = held_bad = 0
        growths = 0
        t0 = time.perf_counter()
        for dt, (shards, hi) in data.items():
            for mult in (None, 8, 64):
                n = z.exact_batches // 3
                feeder = DeviceFeeder(dev, pad_id=hi if mult != 8 else 0, pad_to_multiple_of=mult, prefetch=3, **kw)
                plans = [random_plan(rng, shards, 0 if i % 97 == 13 else int(rng.integers(1, z.exact_max_b + 1)),
                                     z.exact_max_len) for i in range(n)]
                got: list[Triplets] = []
                refs: list[Triplets] = []
                for i, plan in enumerate(plans):
                    feeder.submit(plan)  # 3 in flight: every slot is rewritten while the others copy
                    if feeder.pending >= 3 or i == n - 1:
                        while feeder.pending >= (3 if i < n - 1 else 1):
                            got.append(feeder.get())
                            refs.append(reference(plans[len(got) - 1], feeder, dev))
                            # compared at once, on the consumer's stream (it waited on the batch's event)
                            bad += not same(got[-1], refs[-1])
                            checked += 1
                # every batch held until now while the ring was rewritten: still intact?
                held_bad += sum(not same(g, r) for g, r in zip(got, refs, strict=True))
                growths += feeder.host_allocations - min(3, n)  # allocations beyond one per slot
                feeder.close()
        ok = bad == 0 and held_bad == 0
        ok_all &= ok
        rows.append([f"exactness: {mode}", f"{checked} batches, {bad} differ; re-checked held: {held_bad} differ; "
                     f"{growths} ring-buffer growths ({time.perf_counter() - t0:.1f} s)", "PASS" if ok else "FAIL"])
    if dev.type == "cuda":
        rows.append(check_no_sync(dev, data[np.uint16][0], z, rng))
    return rows, ok_all


def reference(plan: BatchPlan, feeder: DeviceFeeder, dev: torch.device) -> Triplets:
    """The CPU path: ``assemble`` then ``.to(device)``."""
    return assemble(*plan.args(), pad_id=feeder.pad_id, pad_to_multiple_of=feeder.pad_to_multiple_of,
                    indices=plan.indices, columns=plan.columns).to(dev)


def check_no_sync(dev: torch.device, shards: list[np.ndarray], z: Sizes, rng: np.random.Generator) -> list[str]:
    res = []
    plans = [random_plan(rng, shards, 32, 1000) for _ in range(40)]
    for mode, kw in MODES.items():
        feeder = DeviceFeeder(dev, pad_id=0, prefetch=2, **kw)
        feeder.submit(plans[0])
        feeder.get()  # first pinned allocation happens outside the checked region
        feeder.submit(plans[0])
        feeder.get()
        torch.cuda.set_sync_debug_mode("error")
        err = ""
        try:
            for plan in plans:
                feeder.submit(plan)
                if feeder.pending >= 2:
                    feeder.get()
            while feeder.pending:
                feeder.get()
        except RuntimeError as e:  # raised by a synchronizing call
            err = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        feeder.close()
        res.append(f"{mode.split()[-1]}: {'none' if not err else err}")
    ok = all(r.endswith("none") for r in res)
    return ["no implicit sync in submit/get", "; ".join(res), "PASS" if ok else "FAIL"]


# --- (2) throughput ----------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    h2d_bytes: float  # per batch
    batches_s: float
    cpu_ms: float  # host process CPU time per batch
    out_bytes: float  # per batch, delivered


def _timed(dev: torch.device, n: int, body) -> tuple[float, float]:
    sync(dev)
    c0, t0 = time.process_time(), time.perf_counter()
    body()
    sync(dev)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e3


def bench(dev: torch.device, z: Sizes, root: Path, rng: np.random.Generator) -> tuple[list[Row], dict[str, float]]:
    cuda = dev.type == "cuda"
    tok = mmap_shard(root, "bench.npy", rng.integers(0, 50_000, z.tokens, dtype=np.uint16))
    plans = []
    for _ in range(z.plans):
        b = z.batch
        p = rng.integers(32 if z is FULL else 1, z.max_half, b)
        c = rng.integers(16 if z is FULL else 1, z.max_half, (2, b))
        ps = rng.integers(0, z.tokens - z.max_half, b)
        cs = rng.integers(0, z.tokens - z.max_half, (2, b))
        plans.append(BatchPlan([tok] * b, ps, p, cs, c, np.arange(b), {}))
    kw = dict(pad_id=0, pad_to_multiple_of=z.mult)
    refs = [assemble(*q.args(), **kw, indices=q.indices) for q in plans]  # also warms the page cache
    mean_out = float(np.mean([out_bytes(r) for r in refs]))
    n = z.iters
    rows = []

    # ceiling: the usual path's output bytes, one copy from a pinned buffer into preallocated memory
    sizes = [out_bytes(r) for r in refs]
    src = torch.randint(0, 255, (max(sizes),), dtype=torch.uint8)
    src = src.pin_memory() if cuda else src
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=dev)

    def ceiling(k: int) -> None:
        for i in range(k):
            m = sizes[i % len(sizes)]
            dst[:m].copy_(src[:m], non_blocking=True)

    ceiling(z.warmup)
    bs, cpu = _timed(dev, n, lambda: ceiling(n))
    rows.append(Row("ceiling: pinned copy of the output bytes" if cuda else "ceiling: copy of the output bytes",
                    mean_out, bs, cpu, mean_out))

    def usual(k: int) -> None:
        for i in range(k):
            q = plans[i % len(plans)]
            t = assemble(*q.args(), **kw, indices=q.indices)  # collate, pageable memory
            if cuda:
                t = t.pin_memory()  # the DataLoader pin thread's copy
            t.to(dev, non_blocking=True)

    usual(z.warmup)
    bs, cpu = _timed(dev, n, lambda: usual(n))
    rows.append(Row("usual path: assemble, pin_memory(), .to()" if cuda else "usual path: assemble", mean_out, bs,
                    cpu, mean_out))

    # host gather alone (what stays on the CPU whatever the device), against assemble
    buf = np.empty(max(layout_for(q, compact=False, pad_to_multiple_of=z.mult, host_widen=True).nbytes
                       for q in plans), dtype=np.uint8)
    host = {}
    for name, fn in [("assemble (the CPU path)", lambda q: assemble(*q.args(), **kw, indices=q.indices))] + [
            (mode, lambda q, m=mkw: write_host(q, layout_for(q, compact=m["compact"], pad_to_multiple_of=z.mult,
                                                             host_widen=m.get("host_widen", False)), buf, pad_id=0))
            for mode, mkw in MODES.items()]:
        best = float("inf")
        for _ in range(3):  # best of three: the CPU may be shared
            t0 = time.perf_counter()
            for i in range(n):
                fn(plans[i % len(plans)])
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        host[name] = best

    for mode, mkw in MODES.items():
        feeder = DeviceFeeder(dev, prefetch=2, **kw, **mkw)

        def run(k: int, feeder: DeviceFeeder = feeder) -> None:
            for i in range(k):
                feeder.submit(plans[i % len(plans)])
                if feeder.pending >= feeder.prefetch:
                    feeder.get()
            while feeder.pending:
                feeder.get()

        run(z.warmup)
        h2d = float(np.mean([layout_for(q, compact=mkw["compact"], pad_to_multiple_of=z.mult,
                                        host_widen=mkw.get("host_widen", False)).nbytes for q in plans]))
        bs, cpu = _timed(dev, n, lambda: run(n))
        rows.append(Row(mode, h2d, bs, cpu, mean_out))
        feeder.close()
    return rows, host


# --- (3) overlap ----------------------------------------------------------------------------------------------
def overlap(dev: torch.device, z: Sizes, root: Path, rng: np.random.Generator) -> list[list[str]]:
    tok = np.load(root / "bench.npy", mmap_mode="r")
    plans = []
    for _ in range(z.overlap_batches):
        b = z.batch
        plans.append(BatchPlan([tok] * b, rng.integers(0, z.tokens - 2048, b), rng.integers(32, 1024, b),
                               rng.integers(0, z.tokens - 2048, (2, b)), rng.integers(16, 1024, (2, b)),
                               np.arange(b), {}))
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def chain(k: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(k):
            torch.mm(a, a, out=out)
        e.record()
        return s, e

    chain(3)
    s, e = chain(10)
    e.synchronize()
    k = max(10, int(z.matmul_ms / (s.elapsed_time(e) / 10)))
    rows = []
    for mode, mkw in MODES.items():
        feeder = DeviceFeeder(dev, pad_id=0, prefetch=2, **mkw)
        for q in plans[:4]:  # warm: ring buffers allocated, kernels loaded
            feeder.submit(q)
            feeder.get()
        sync(dev)
        s, e = chain(k)
        e.synchronize()
        alone = s.elapsed_time(e)
        s, e = chain(k)  # enqueued; the host returns at once
        h0 = time.perf_counter()
        got = []
        for q in plans:
            feeder.submit(q)
            if feeder.pending >= 2:
                got.append(feeder.get())  # the default stream waits on the batch's event only
        while feeder.pending:
            got.append(feeder.get())
        host_ms = (time.perf_counter() - h0) * 1e3
        fed = torch.cuda.Event(enable_timing=True)
        fed.record(feeder.stream)  # after the last copy and expansion on the feeder's stream
        while not fed.query():
            time.sleep(1e-4)
        mm_busy_when_fed = not e.query()
        e.synchronize()
        with_feeder = s.elapsed_time(e)
        ready_at = s.elapsed_time(fed)
        feeder.close()
        ok = mm_busy_when_fed and ready_at < with_feeder and host_ms < alone
        rows.append([f"overlap: {mode}",
                     f"{len(plans)} batches ready {ready_at:.1f} ms into a {with_feeder:.1f} ms matmul chain "
                     f"(alone {alone:.1f} ms, {100 * (with_feeder / alone - 1):+.1f}%); host in submit/get "
                     f"{host_ms:.1f} ms", "PASS" if ok else "FAIL"])
    return rows


# --- main ---------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI checks the script runs)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="123", help="which of (1) exactness, (2) throughput, (3) overlap to run")
    args = ap.parse_args()
    z = SMOKE if args.cpu_smoke else FULL
    dev = torch.device("cpu" if args.cpu_smoke else (args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu or --cpu-smoke", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# pairpack gpu_check: device {dev} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPUs, sizes {'smoke' if z is SMOKE else 'full'}", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pairpack-gpu-check-") as tmp:
        root = Path(tmp)
        checks, exact_ok = [], True
        if "1" in args.sections:
            checks, exact_ok = check_exactness(dev, z, root, rng)
            print(f"# (1) done in {time.perf_counter() - t_start:.1f} s", flush=True)
        rows, host = bench(dev, z, root, rng)  # (3) uses its data file
        print(f"# (2) done in {time.perf_counter() - t_start:.1f} s", flush=True)
        if "3" not in args.sections:
            pass
        elif dev.type == "cuda":
            checks += overlap(dev, z, root, rng)
        else:
            checks.append(["overlap", "n/a on the CPU (needs CUDA streams)", "n/a"])

    cuda_dev = dev.type == "cuda"
    usual = next(r for r in rows if r.name.startswith("usual"))
    ceil = rows[0]
    print()
    print(f"## (2) throughput: batches of {z.batch} pairs, rows up to {2 * z.max_half} tokens "
          f"(padded to x{z.mult}), uint16; {z.iters} batches per path")
    print("batches/s: delivered on the device (pipelined, prefetch 2); output GB/s: the int64 batch bytes delivered;")
    print("host CPU: process CPU time per batch; ceiling: the usual path's output bytes in one copy each"
          + ("" if cuda_dev else "; on the CPU the feeder rows include the expansion, done by the CPU"))
    print()
    print("| path | H2D bytes/batch | batches/s | output GB/s | host CPU ms/batch | x usual | % of ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.name} | {r.h2d_bytes / 1e6:.3f} MB | {r.batches_s:,.0f} | {r.batches_s * r.out_bytes / 1e9:.2f} | "
              f"{r.cpu_ms:.3f} | {r.batches_s / usual.batches_s:.2f} | {100 * r.batches_s / ceil.batches_s:.0f}% |")
    print()
    print("host gather only (layout + gather into a preallocated buffer; no device work), best of 3:")
    print()
    print("| host step | us/batch | x assemble |")
    print("|---|---:|---:|")
    base = host["assemble (the CPU path)"]
    for k, v in host.items():
        print(f"| {k} | {v:.0f} | {base / v:.2f} |")
    by = {r.name: r for r in rows}
    if dev.type == "cuda":
        pad, comp = by["feeder padded"], by["feeder compact"]
        targets = [
            ("padded >= 80% of the pinned-copy ceiling", pad.batches_s >= 0.8 * ceil.batches_s),
            ("padded >= 2x the usual path", pad.batches_s >= 2 * usual.batches_s),
            ("compact >= 3x the usual path", comp.batches_s >= 3 * usual.batches_s),
        ]
        for t, ok in targets:
            checks.append([f"target: {t}", "", "PASS" if ok else "FAIL"])
    else:
        checks.append(["targets of (2)", "n/a on the CPU (no H2D copy)", "n/a"])
    print()
    print("## (1) exactness and (3) overlap")
    print()
    print("| check | result | verdict |")
    print("|---|---|---|")
    for c in checks:
        print(f"| {c[0]} | {c[1]} | {c[2]} |")
    verdict = ("PASS" if exact_ok else "FAIL") if "1" in args.sections else "not run"
    print(f"\n# total {time.perf_counter() - t_start:.1f} s; exactness {verdict}")
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
