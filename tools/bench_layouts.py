#!/usr/bin/env python
"""Layouts benchmark (data side): tokens the model processes per pair, fill, and Loader throughput of
the padded, packed and prefix-shared layouts, on three datasets, as ratios measured in one run.

    python tools/bench_layouts.py            # ~1-2 min on 2 cores
    python tools/bench_layouts.py --quick    # smaller sets, shorter timings
    python tools/bench_layouts.py --breakdown  # also one batch's kernel / take / Python time and bytes

Datasets:
  sample        the bundled Alpaca-style sample (pairpack/data), built with the GPT-2 tokenizer from
                ../shared/tokenizers when present (skipped otherwise)
  HH-like       generated: long multi-turn prompts (log-normal, median 180 tokens), short answers (median 40)
  UF-like       generated: short prompts (median 50), long answers (median 350): UltraFeedback's shape

Tokens per pair: the loader's own batches (epoch 0, one rank, length-grouped order), every token
slot the model processes counted (padding included): padded ``2 B L``, packed layouts ``R T``.
Fill: real tokens / processed tokens. "x P+C+R": tokens per pair over the mean ``P + C + R``
(1.00 = no padding and no duplicated prompt). Targets (issue 17): prefix shared + packed at most
1.03x mean(P+C+R) with fill >= 97%.

Throughput: ``Loader(batch_size=32)`` iterated over the same pairs in each layout (same batches),
batches/s best of repeats, and the ratio to padded (target >= 0.5x).

The model side (training-step time per layout) is added by ``--steps`` (helper 17b), not here.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import pairpack
from pairpack.batch.loader import Loader

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("padded", "packed", "prefix_shared")


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(np.int64)


def generate(path: Path, n: int, prompt: float, answer: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    p = _lognormal(rng, prompt, 0.6, n, 4, 4096)
    c = _lognormal(rng, answer, 0.6, n, 1, 2048)
    r = _lognormal(rng, answer, 0.6, n, 1, 2048)
    with pairpack.Writer(path, vocab_size=50257, pad_id=50256) as w:
        for i in range(n):
            w.add(rng.integers(0, 50000, p[i]), rng.integers(0, 50000, c[i]), rng.integers(0, 50000, r[i]))
    return path


def build_sample(path: Path) -> Path | None:
    tok = ROOT.parent / "shared" / "tokenizers" / "gpt2.tokenizer.json"
    if not tok.exists():
        return None
    pairpack.build([ROOT / "pairpack" / "data" / "instruction-data-with-preference.json"], path, tokenizer=str(tok),
                   progress=False)
    return path


def tokens_table(ds: pairpack.Dataset, budget: int, max_row_tokens: int | None) -> list[dict]:
    from pairpack.batch.plan import tokens_processed

    out = []
    for layout in LAYOUTS:
        ld = Loader(ds, max_tokens=budget, group_by_length=True, seed=0, layout=layout,
                    max_row_tokens=None if layout == "padded" else max_row_tokens)
        batches = ld.batches()
        pairs = sum(len(b) for b in batches)
        done = tokens_processed(ds.lengths, batches, ld.options, ld.effective_truncation)
        used = np.concatenate(batches)
        p, c, r = ld.effective_truncation.lengths(ds.lengths[:, used])
        real = {"padded": 2 * p + c + r, "packed": 2 * p + c + r, "prefix_shared": p + c + r}[layout].sum()
        # fill of the budget: real tokens per batch over max_tokens, all batches but the smallest
        # (the epoch's remainder)
        per_batch = sorted(float(x) for x in np.add.reduceat(
            np.asarray(ld.options.pair_tokens(*ld.effective_truncation.apply(
                ds.lengths[0, used], ds.lengths[1, used], ds.lengths[2, used])), dtype=np.int64),
            np.concatenate([[0], np.cumsum([len(b) for b in batches])[:-1]])))[1:]
        out.append({"layout": layout, "per_pair": done / pairs, "fill": real / done,
                    "budget_fill": (min(per_batch) / budget) if per_batch else 1.0,
                    "ideal": float((p + c + r).mean()), "batches": len(batches)})
    return out


def throughput(ds: pairpack.Dataset, seconds: float, max_row_tokens: int | None) -> dict[str, float]:
    """batches/s of a Loader(batch_size=32) epoch in each layout, best of repeats within ``3 * seconds``.
    The layouts take turns, an epoch each, so a slow spell of the machine hits all of them alike."""
    loaders = {layout: Loader(ds, batch_size=32, seed=0, layout=layout,
                              max_row_tokens=None if layout == "padded" else max_row_tokens) for layout in LAYOUTS}
    rates = dict.fromkeys(LAYOUTS, 0.0)
    t_end = time.perf_counter() + 3 * seconds
    while time.perf_counter() < t_end or not all(rates.values()):
        for layout, ld in loaders.items():
            t0 = time.perf_counter()
            n = 0
            for b in ld:
                n += 1
                del b
            rates[layout] = max(rates[layout], n / (time.perf_counter() - t0))
    return rates


def breakdown(ds: pairpack.Dataset, name: str) -> None:
    """Where a batch's time goes (one random batch of 32, the C kernels): ``batch_of`` in each
    layout against its kernel and ``take``, the rest being Python; and the bytes of its tensors."""
    import timeit
    from dataclasses import fields

    import torch

    from pairpack import _accel
    from pairpack.batch import layouts
    from pairpack.batch.options import PlanOptions
    from pairpack.batch.plan import batch_of

    nat = _accel.native
    if nat is None:
        print(f"{name}: the C kernels are not built; no breakdown")
        return

    def us(fn) -> float:
        return min(timeit.repeat(fn, number=3000, repeat=3)) / 3000 * 1e6

    def nbytes(b) -> int:
        return sum(v.nbytes for v in (getattr(b, f.name) for f in fields(b)) if isinstance(v, torch.Tensor))

    idx = np.random.default_rng(0).permutation(len(ds))[:32].astype(np.int64)
    pad = batch_of(ds, idx)
    toks, coords, _ = ds._located(nat, idx, None)
    loc = us(lambda: ds._located(nat, idx, None))
    print(f"{name}: padded batch_of {us(lambda: batch_of(ds, idx)):.1f} us, {nbytes(pad):,} bytes over "
          f"{2 * pad.preferred_seq.numel():,} token slots; take {loc:.1f} us")
    for layout in LAYOUTS[1:]:
        o = PlanOptions(layout=layout)
        got = batch_of(ds, idx, options=o)
        p, cl = coords[5], coords[6:8]
        rows, t = layouts._rows(p, cl, o)
        s = len(idx) * (1 if layout == "prefix_shared" else 2)
        e, i64, nr = np.empty, np.int64, len(rows) - 1
        outs = (e((nr, t), i64), e((nr, t), i64), e((nr, t), np.int32), e((nr, t), np.int8), e((nr, t), np.bool_),
                e(s + 1, np.int32), e(s, i64), e(s, np.int8), e((s, 2), i64))
        kern = us(lambda: nat.layout(toks, None if len(toks) == 1 else coords[1], coords[2], p, coords[3:5], cl, rows,
                                     layout == "prefix_shared", ds.pad_id, outs))
        total = us(lambda: batch_of(ds, idx, options=o))
        # the scoring map is derived by the consumer (DPO) on the batch's device: its cost here, on the CPU
        smap = us(lambda: layouts._score_map(got))
        print(f"  {layout}: batch_of {total:.1f} us = layout kernel {kern:.1f} + take {loc:.1f} + the rest "
              f"{total - kern - loc:.1f} (Python); {nbytes(got):,} bytes ({nbytes(got) / nbytes(pad):.2f}x padded) "
              f"over {got.padded_tokens():,} token slots; scoring map of {got.num_scored:,} tokens derived "
              f"on use: {smap:.1f} us on the CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (all layouts)")
    ap.add_argument("--max-row-tokens", type=int, default=None,
                    help="row bound of the packed layouts (default: one row per batch budget)")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per layout for the throughput rows")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time one batch's kernel, take and Python in each layout, and count its bytes")
    args = ap.parse_args()
    n = 4000 if args.quick else args.pairs
    secs = 0.5 if args.quick else args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="bench_layouts_"))
    try:
        sets = []
        s = build_sample(tmp / "sample")
        if s is not None:
            sets.append(("sample (Alpaca, GPT-2)", pairpack.open(s)))
        sets.append(("HH-like", pairpack.open(generate(tmp / "hh", n, 180, 40, 1))))
        sets.append(("UF-like", pairpack.open(generate(tmp / "uf", n, 50, 350, 2))))
        rows_txt = "one row per batch" if args.max_row_tokens is None else f"rows <= {args.max_row_tokens}"
        print(f"budget max_tokens={args.max_tokens:,} per batch, {rows_txt}, length-grouped, epoch 0\n")
        print("| data | pairs | mean P+C+R | layout | tokens/pair | x P+C+R | fill | budget fill (min) | saving vs padded |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        thr = []
        for name, ds in sets:
            tab = tokens_table(ds, args.max_tokens, args.max_row_tokens)
            base = tab[0]["per_pair"]
            for row in tab:
                print(f"| {name} | {len(ds):,} | {row['ideal']:,.1f} | {row['layout']} | {row['per_pair']:,.1f} | "
                      f"{row['per_pair'] / row['ideal']:.3f} | {100 * row['fill']:.1f}% | "
                      f"{100 * row['budget_fill']:.1f}% | {base / row['per_pair']:.2f}x |")
            thr.append((name, throughput(ds, secs, args.max_row_tokens)))
        print("\nLoader throughput, batch_size=32, same pairs in every layout (batches/s, best of repeats)\n")
        print("| data | padded | packed | prefix_shared | packed / padded | prefix_shared / padded |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in thr:
            print(f"| {name} | {r['padded']:,.0f} | {r['packed']:,.0f} | {r['prefix_shared']:,.0f} | "
                  f"{r['packed'] / r['padded']:.2f}x | {r['prefix_shared'] / r['padded']:.2f}x |")
        if args.breakdown:
            print("\nOne batch of 32 pairs (best of 3 x 3,000 calls)\n")
            for name, ds in sets:
                breakdown(ds, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
