"""Build rate and ``ds.batch`` rate on the bundled sample, each against a baseline from the same run.

    python tools/bench_sample.py [--repeats 3] [--batches 2000] [--batch-size 32] [--json]

* build: ``pairpack.ingest.build.build(sample, <tmp>/ds, prompt="instruction", force=True)``, the median
  of ``--repeats`` runs, as pairs/s and MB/s of input. Baseline: parsing the same JSON and
  byte-tokenizing every segment (the least any build must do), so the ratio is the cost of
  writing, de-duplicating, checksumming and fsyncing on top of that.
* batch: ``ds.batch(idx)`` for random batches of ``--batch-size`` indices (seeded), in pairs/s.
  Baseline: a per-pair torch assembly (``pad_sequence`` of ``torch.from_numpy`` rows plus masks
  from lengths), the obvious way to write it by hand.

Everything is written under a temporary directory that is removed afterwards. Figures are
wall-clock medians on whatever machine runs this; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402

import pairpack  # noqa: E402
from pairpack.ingest.build import build  # noqa: E402
from pairpack.tokenization import ByteTokenizer  # noqa: E402

SAMPLE = Path(pairpack.__file__).resolve().parent / "data" / "instruction-data-with-preference.json"


def parse_baseline(path: Path) -> float:
    """Seconds to parse the sample and byte-tokenize its three segments per record."""
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    for rec in json.loads(path.read_bytes()):
        for key in ("instruction", "chosen", "rejected"):
            tok.encode(rec[key])
    return time.perf_counter() - t0


def naive_batch(ds: pairpack.Dataset, idx: np.ndarray, pad_id: int) -> tuple[torch.Tensor, ...]:
    """The same five tensors as ``ds.batch(idx)``, assembled pair by pair (the baseline)."""
    rows_c, rows_r, plen, clen, rlen = [], [], [], [], []
    for i in idx.tolist():
        p, c, r = ds[i]
        rows_c.append(torch.from_numpy(np.concatenate([p, c]).astype(np.int64)))
        rows_r.append(torch.from_numpy(np.concatenate([p, r]).astype(np.int64)))
        plen.append(len(p))
        clen.append(len(p) + len(c))
        rlen.append(len(p) + len(r))
    n = max(max(clen), max(rlen))
    pref = pad_sequence(rows_c, batch_first=True, padding_value=pad_id)
    unpref = pad_sequence(rows_r, batch_first=True, padding_value=pad_id)
    pref = torch.nn.functional.pad(pref, (0, n - pref.shape[1]), value=pad_id)
    unpref = torch.nn.functional.pad(unpref, (0, n - unpref.shape[1]), value=pad_id)
    pos = torch.arange(n)
    return (pref, unpref, pos < torch.tensor(plen)[:, None], pos < torch.tensor(clen)[:, None],
            pos < torch.tensor(rlen)[:, None])


def time_batches(fn, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for idx in batches:
        fn(idx)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="build runs (median reported)")
    ap.add_argument("--batches", type=int, default=2000, help="random batches timed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()

    input_bytes = SAMPLE.stat().st_size
    with tempfile.TemporaryDirectory(prefix="pairpack-bench-") as d:
        out = Path(d) / "ds"
        build_s, pairs = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rep = build([SAMPLE], out, prompt="instruction", force=True, progress=False)
            build_s.append(time.perf_counter() - t0)
            pairs = rep.pairs
        base_s = statistics.median(parse_baseline(SAMPLE) for _ in range(args.repeats))
        b_med = statistics.median(build_s)

        ds = pairpack.open(out)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(ds), args.batch_size) for _ in range(args.batches)]
        ds.batch(batches[0]), naive_batch(ds, batches[0], ds.pad_id)  # warm up (imports, page-in)
        # the fast path and the baseline must agree before either is timed
        want, got = naive_batch(ds, batches[1], ds.pad_id), ds.batch(batches[1])
        if not all(torch.equal(a, b) for a, b in zip(want, got.as_kwargs().values())):
            raise SystemExit("ds.batch disagrees with the per-pair baseline")
        fast = time_batches(ds.batch, batches)
        slow = time_batches(lambda i: naive_batch(ds, i, ds.pad_id), batches)
        ds.close()

    n_batch = args.batches * args.batch_size
    res = {
        "sample": SAMPLE.name, "pairs": pairs, "input_bytes": input_bytes, "build_repeats": args.repeats,
        "build_seconds_median": b_med, "build_pairs_per_s": pairs / b_med,
        "build_input_mb_per_s": input_bytes / b_med / 1e6,
        "parse_baseline_pairs_per_s": pairs / base_s, "build_vs_parse": base_s / b_med,
        "batch_size": args.batch_size, "batches": args.batches,
        "batch_pairs_per_s": n_batch / fast, "naive_batch_pairs_per_s": n_batch / slow,
        "batch_speedup_vs_naive": slow / fast,
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"sample {SAMPLE.name}: {pairs} pairs, {input_bytes / 1e6:.3f} MB")
    print(f"build (median of {args.repeats}): {b_med * 1e3:.1f} ms = {res['build_pairs_per_s']:,.0f} pairs/s, "
          f"{res['build_input_mb_per_s']:.2f} MB/s of input; parse+tokenize baseline "
          f"{res['parse_baseline_pairs_per_s']:,.0f} pairs/s (build runs at {res['build_vs_parse']:.2f}x of it)")
    print(f"ds.batch, {args.batches} random batches of {args.batch_size}: {res['batch_pairs_per_s']:,.0f} pairs/s; "
          f"per-pair torch baseline {res['naive_batch_pairs_per_s']:,.0f} pairs/s "
          f"(ds.batch {res['batch_speedup_vs_naive']:.2f}x faster)")


if __name__ == "__main__":
    main()
