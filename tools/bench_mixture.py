#!/usr/bin/env python
"""Mixture, split and overlap benchmark (issue 26 targets), every figure measured in one run.

    python tools/bench_mixture.py                 # planning at 1M and 10M pairs, the rest at 1M
    python tools/bench_mixture.py --quick         # planning at 200k, split/overlap at 200k

Prints, each as the target's ratio or size:
  planning memory   a mixture of three sources vs one dataset holding the same pairs (three shards),
                    at the same total size, random and length-grouped epochs: anonymous memory
                    kept after planning (RssAnon delta, bytes per pair; then again after
                    malloc_trim, which returns the heap pages glibc keeps after freeing the
                    temporaries: the raw figure depends on the allocator's state), the numpy arrays still
                    alive after planning (tracemalloc current: the plan cache and the joined
                    lengths) and the numpy peak while planning (tracemalloc peak, bytes per pair).
                    Each in a fresh process.
  throughput        Loader batches/s on the mixture vs the single dataset, batch_size 32, same
                    pairs (log-normal lengths, medians 180/220/220 tokens): time per batch, the two
                    loaders alternating batch by batch (median and mean over 2,000 batches each).
  state_dict        JSON bytes of a mixture state (epoch_size 10**12, and mid-epoch at 1M).
  split             ``pairpack.ops.split.split`` of a 1M-pair dataset (3 pairs per prompt on average,
                    prompt median 100 tokens): seconds, and the process's peak anonymous memory per pair.
  overlap           ``pairpack.ops.overlap.overlap`` of two 1M-pair datasets sharing half their prompts.

Datasets for planning hold only index arrays that matter (every segment points at one small token
array: planning reads lengths, never tokens); throughput, split and overlap datasets hold real tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pairpack  # noqa: E402
from pairpack import format as fmt  # noqa: E402

VOCAB, PAD = 50_000, 0
SHARES = (0.5, 0.3, 0.2)  # the three sources' parts of the total


def lognormal(n: int, rng: np.random.Generator, med: tuple[float, float, float], sigma: float = 0.6) -> np.ndarray:
    m = np.array(med)[:, None]
    return np.clip(np.rint(m * np.exp(sigma * rng.standard_normal((3, n)))), 1, 4096).astype(np.int64)


def write_dataset(path: Path, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]], name: str) -> None:
    """A dataset straight in the format (FORMAT.md §3-§6): shards of (tokens, starts (3, n), lengths (3, n))."""
    infos = []
    for k, (tokens, starts, lengths) in enumerate(shards):
        sname = f"shard-{k:05d}"
        d = path / sname
        d.mkdir(parents=True)
        files = {}
        for key, fname, arr in (("tokens", fmt.TOKENS_FILE, tokens), ("starts", fmt.STARTS_FILE, starts),
                                ("lengths", fmt.LENGTHS_FILE, lengths)):
            p = d / fname
            with open(p, "wb") as f:
                f.write(fmt.npy_header(arr.dtype, arr.shape))
                f.write(np.ascontiguousarray(arr).data)
            files[key] = fmt.FileEntry(f"{sname}/{fname}", p.stat().st_size, fmt.file_checksum(p))
        infos.append(fmt.ShardInfo(sname, starts.shape[1], len(tokens), len(np.unique(starts[0])), files))
    m = fmt.Manifest(num_pairs=sum(i.num_pairs for i in infos), token_dtype="uint16", vocab_size=VOCAB, pad_id=PAD,
                     bos_id=None, eos_id=None, tokenizer=None, shards=tuple(infos),
                     provenance={"generator": f"tools/bench_mixture.py {name}"})
    (path / fmt.MANIFEST_NAME).write_bytes(m.dumps())


def index_only(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.arange(1, int(lengths.max()) + 1, dtype=np.uint16)
    return tokens, np.zeros_like(lengths), lengths


def real(lengths: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs laid out prompt, chosen, rejected, random ids."""
    n = lengths.shape[1]
    flat = lengths.T.reshape(-1)
    ends = np.cumsum(flat)
    starts = (ends - flat).reshape(n, 3).T.copy()
    return rng.integers(1, VOCAB, int(ends[-1]), dtype=np.uint16), starts, lengths


def shared_prompts(n: int, prompts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n pairs over ``prompts`` distinct prompts (each stored once, median 100 tokens, after an 8-token
    segment that every completion points at: split and overlap read prompts only)."""
    plen = np.clip(np.rint(100 * np.exp(0.6 * rng.standard_normal(prompts))), 1, 2048).astype(np.int64)
    pstart = np.concatenate([[8], 8 + np.cumsum(plen)[:-1]])
    tokens = rng.integers(1, VOCAB, int(8 + plen.sum()), dtype=np.uint16)
    which = np.sort(rng.integers(0, prompts, n))
    starts = np.stack([pstart[which], np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    lengths = np.stack([plen[which], np.full(n, 4, dtype=np.int64), np.full(n, 4, dtype=np.int64)])
    return tokens, starts, lengths


def other_half(a: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B: A's prompt layout with the tokens of the prompts stored in the second half of the token array
    redrawn (new prompts), and the pairs re-drawn over all of them: about half of B's prompts are A's."""
    tokens, starts, lengths = a
    tokens = tokens.copy()
    mid = len(tokens) // 2
    tokens[mid:] = rng.integers(1, VOCAB, len(tokens) - mid, dtype=np.uint16)
    uniq = np.unique(np.stack([starts[0], lengths[0]]), axis=1)
    which = np.sort(rng.integers(0, uniq.shape[1], starts.shape[1]))
    n = len(which)
    return tokens, np.stack([uniq[0][which], starts[1], starts[2]]), np.stack([uniq[1][which], lengths[1], lengths[2]])


def parts(lengths: np.ndarray) -> list[np.ndarray]:
    n = lengths.shape[1]
    cut = np.rint(np.cumsum((0,) + SHARES) * n).astype(int)
    return [lengths[:, cut[k]:cut[k + 1]] for k in range(3)]


# --- measurements in a fresh process -----------------------------------------------------------------
CHILD = r"""
import ctypes, json, sys, time, tracemalloc
sys.path.insert(0, {root!r})
import pairpack
from pairpack.batch.loader import Loader

def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024

kind, args = {kind!r}, {args!r}
if kind == 'plan':
    src = args['sources']
    if args['mixture']:
        ld = Loader({{k: pairpack.open(p) for k, p in src.items()}}, weights=[1, 1, 1], epoch_size=args['n'],
                    batch_size=32, group_by_length=args['grouped'])
    else:
        ld = Loader(pairpack.open(args['single']), batch_size=32, group_by_length=args['grouped'])
    a0 = anon()
    tracemalloc.start()
    t = time.perf_counter()
    nb = len(ld)
    dt = time.perf_counter() - t
    live, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = anon() - a0
    ctypes.CDLL('libc.so.6').malloc_trim(0)  # free heap pages the allocator kept after planning's temporaries
    print(json.dumps({{'kept': kept, 'trimmed': anon() - a0, 'live': live, 'peak': peak, 'seconds': dt,
                      'batches': nb}}))
elif kind == 'split':
    from pairpack.ops.split import split
    a0 = anon()
    tracemalloc.start()
    rep = split(args['path'], eval_fraction=0.02, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({{'seconds': rep.seconds, 'peak': peak, 'kept': anon() - a0, 'splits': rep.splits}}))
elif kind == 'overlap':
    from pairpack.ops.overlap import overlap
    tracemalloc.start()
    rep = overlap(args['a'], args['b'])
    print(json.dumps({{**rep.as_dict(), 'peak': tracemalloc.get_traced_memory()[1]}}))
"""


def child(kind: str, args: dict) -> dict:
    code = CHILD.format(root=str(ROOT), kind=kind, args=args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def planning(tmp: Path, n: int, rng: np.random.Generator) -> None:
    lengths = lognormal(n, rng, (180.0, 220.0, 220.0))
    d = tmp / f"plan{n}"
    src = {}
    for name, part in zip("abc", parts(lengths)):
        write_dataset(d / name, [index_only(part)], "plan source")
        src[name] = str(d / name)
    write_dataset(d / "single", [index_only(p) for p in parts(lengths)], "plan single")
    del lengths
    for grouped in (False, True):
        got = {}
        for mixture in (False, True):
            got[mixture] = child("plan", {"sources": src, "single": str(d / "single"), "mixture": mixture,
                                          "grouped": grouped, "n": n})
        s, m = got[False], got[True]
        print(f"planning {n:>12,} pairs, {'grouped' if grouped else 'random '}: "
              f"kept {s['kept'] / n:5.1f} B/pair single, {m['kept'] / n:5.1f} mixture "
              f"(ratio {m['kept'] / max(s['kept'], 1):.2f}), after malloc_trim {s['trimmed'] / n:5.1f} single, "
              f"{m['trimmed'] / n:5.1f} mixture (ratio {m['trimmed'] / max(s['trimmed'], 1):.2f}); numpy live {s['live'] / n:5.1f} single, {m['live'] / n:5.1f} "
              f"mixture (ratio {m['live'] / max(s['live'], 1):.2f}); numpy peak {s['peak'] / n:5.1f} single, "
              f"{m['peak'] / n:5.1f} mixture (ratio {m['peak'] / max(s['peak'], 1):.2f}); "
              f"plan {s['seconds']:.2f} s single, {m['seconds']:.2f} s mixture")
    import shutil

    shutil.rmtree(d)


def throughput(tmp: Path, n: int, batches: int, rng: np.random.Generator, rounds: int = 5) -> None:
    from pairpack.batch.loader import Loader

    lengths = lognormal(n, rng, (180.0, 220.0, 220.0))
    d = tmp / "tput"
    shards = [real(p, rng) for p in parts(lengths)]
    for name, sh in zip("abc", shards):
        write_dataset(d / name, [sh], "throughput source")
    write_dataset(d / "single", shards, "throughput single")
    del shards
    mix = Loader({k: pairpack.open(d / k) for k in "abc"}, weights=list(SHARES), batch_size=32, seed=1)
    one = Loader(pairpack.open(d / "single"), batch_size=32, seed=1)
    len(mix), len(one)  # planned before timing

    # batch by batch, alternating between the two loaders, so load spikes hit both alike; each
    # loader restarts its epoch when it runs out
    its = {"one": iter(one), "mix": iter(mix)}
    loaders = {"one": one, "mix": mix}
    times: dict[str, list[float]] = {"one": [], "mix": []}
    for _ in range(rounds * batches):
        for k in ("one", "mix"):
            t = time.perf_counter()
            try:
                next(its[k])
            except StopIteration:
                its[k] = iter(loaders[k])
                next(its[k])
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    print(f"throughput, {n:,} pairs, batch_size 32, {rounds * batches} batches each, alternating batch by batch: "
          f"median {1e6 * med['one']:.1f} us/batch single, {1e6 * med['mix']:.1f} us/batch mixture of 3 "
          f"(ratio {med['one'] / med['mix']:.2f}; target >= 0.9); mean {1e6 * mean['one']:.1f} vs "
          f"{1e6 * mean['mix']:.1f} us (ratio {mean['one'] / mean['mix']:.2f})")
    state = mix.state_dict()
    print(f"state_dict: mid-epoch mixture {len(json.dumps(state))} bytes", end="; ")
    huge = Loader({k: pairpack.open(d / k) for k in "abc"}, weights=[1, 2, 3], epoch_size=10**12, batch_size=32)
    print(f"epoch_size 10**12: {len(json.dumps(huge.state_dict()))} bytes (target < 4096)")


def split_and_overlap(tmp: Path, n: int, rng: np.random.Generator) -> None:
    prompts = n // 3
    a = shared_prompts(n, prompts, rng)
    del rng
    write_dataset(tmp / "sa", [a], "split")
    b_tokens, b_starts, b_lengths = other_half(a, np.random.default_rng(99))
    write_dataset(tmp / "sb", [(b_tokens, b_starts, b_lengths)], "overlap")
    s = child("split", {"path": str(tmp / "sa")})
    print(f"split of {n:,} pairs ({prompts:,} prompts drawn, 3 pairs per prompt on average): {s['seconds']:.2f} s "
          f"(target < 10 s); numpy peak {s['peak'] / n:.1f} B/pair, anonymous memory {s['kept'] / n:.1f} B/pair; "
          f"{s['splits']}")
    o = child("overlap", {"a": str(tmp / "sa"), "b": str(tmp / "sb")})
    print(f"overlap of two {n:,}-pair datasets: {o['seconds']:.2f} s (target < 30 s); numpy peak "
          f"{o['peak'] / n:.1f} B/pair; {o['shared_prompts']:,} of {o['b_prompts']:,} prompts of B in A, "
          f"{o['shared_pairs']:,} of {o['b_pairs']:,} pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200k pairs everywhere (about a minute)")
    ap.add_argument("--plan-sizes", default=None, help="comma-separated pair counts for planning (default 1M,10M)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs of the split/overlap datasets (default 1M)")
    ap.add_argument("--tput-pairs", type=int, default=100_000, help="pairs of the throughput datasets")
    ap.add_argument("--batches", type=int, default=400, help="batches per throughput run")
    args = ap.parse_args()
    sizes = ([200_000] if args.quick else [1_000_000, 10_000_000]) if args.plan_sizes is None else \
        [int(x) for x in args.plan_sizes.split(",")]
    pairs = args.pairs or (200_000 if args.quick else 1_000_000)
    rng = np.random.default_rng(0)
    print(f"pairpack {pairpack.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_mixture_") as tmp:
        t = Path(tmp)
        for n in sizes:
            planning(t, n, rng)
        throughput(t, args.tput_pairs, args.batches, rng)
        split_and_overlap(t, pairs, rng)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
