"""Long-running mutation fuzzer of the pairpack reader (the long form of tests/test_fuzz.py).

Each case builds a small valid dataset, damages it (flip bytes, truncate/extend files, edit
manifest numbers and names, swap files between shards, shrink offsets, rewrite .npy headers,
swap in symlinks/dirs/FIFOs), then opens it, reads every pair, assembles batches and verifies.
Pass: pairpack raised only PairpackError, or returned exactly what an independent json+numpy
reader reads (tests/fuzzcore.py). Case ``k`` uses ``random.Random(f"{seed}:{k}")``, so any
failure is reproducible from the seed and case number printed.

    python tools/fuzz.py --seconds 300            # as many cases as fit in 5 minutes
    python tools/fuzz.py --cases 100000 --jobs 8  # a fixed number, on 8 processes
    python tools/fuzz.py --replay 0:1234          # rerun one case and show its mutations

Prints the number of cases, the outcome counts (refused, by FORMAT.md rule; read fine, with or
without verify problems) and every failure; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzzcore import CaseTimeout, run_case  # noqa: E402

CASE_TIMEOUT_S = 30  # a case that blocks (a FIFO opened, a giant allocation) is a failure
_TMP: str | None = None  # where cases are written (--tmp)


def _no_fsync(fd: int) -> None:  # noqa: ARG001
    """Durability is not what the fuzzer tests, and fsync was a third of a case's time."""


def _default_tmp() -> str | None:
    """tmpfs when there is one: a case writes and deletes ~30 small files."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _on_alarm(signum, frame):  # noqa: ARG001
    raise CaseTimeout(f"case ran over {CASE_TIMEOUT_S} s")


def one(seed: str, k: int, keep: Path | None = None, log: list[str] | None = None) -> tuple[str, str | None]:
    """Run case ``k``; return (outcome, failure text or None). ``keep``: copy a failing case there;
    ``log`` receives the mutations applied."""
    with tempfile.TemporaryDirectory(prefix="pairpack-fuzz-", dir=_TMP) as d:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(CASE_TIMEOUT_S)
        try:
            return run_case(random.Random(f"{seed}:{k}"), Path(d), log), None
        except (Exception, CaseTimeout) as e:  # noqa: BLE001 - any other exception is what we look for
            if keep is not None:
                shutil.copytree(d, keep / f"case-{seed}-{k}", symlinks=True, dirs_exist_ok=True)
            return "FAILED", f"case {seed}:{k}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        finally:
            signal.alarm(0)


def _worker(args: tuple[str, int, int, tuple[int | None, float | None], str | None]
            ) -> tuple[int, collections.Counter, list[str]]:
    """Cases start, start + step, ... until the case limit or the deadline."""
    seed, start, step, (limit, until), keep = args
    counts: collections.Counter = collections.Counter()
    fails: list[str] = []
    k, n = start, 0
    while (limit is None or k < limit) and (until is None or time.time() < until):
        outcome, err = one(seed, k, Path(keep) if keep else None)
        counts[outcome] += 1
        if err:
            fails.append(err)
        k += step
        n += 1
    return n, counts, fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None, help="run for this long")
    ap.add_argument("--cases", type=int, default=None, help="run this many cases")
    ap.add_argument("--seed", default="0", help="base seed (cases are seed:0, seed:1, ...)")
    ap.add_argument("--jobs", type=int, default=1, help="processes")
    ap.add_argument("--keep", type=Path, default=None, help="copy failing cases' files into this directory")
    ap.add_argument("--replay", default=None, metavar="SEED:K", help="run one case and print its outcome")
    ap.add_argument("--tmp", default=_default_tmp(), help="directory for the cases' files (default: /dev/shm)")
    ap.add_argument("--fsync", action="store_true", help="keep the writer's fsyncs (off by default: not under test)")
    a = ap.parse_args()
    global _TMP
    _TMP = a.tmp
    if not a.fsync:
        os.fsync = _no_fsync  # type: ignore[assignment] - inherited by the forked workers
    if a.replay:
        seed, k = a.replay.rsplit(":", 1)
        log: list[str] = []
        outcome, err = one(seed, int(k), a.keep, log)
        print("mutations:", *log, sep="\n  ")
        print(outcome if err is None else err)
        sys.exit(1 if err else 0)
    if a.seconds is None and a.cases is None:
        a.seconds = 60.0
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    until = None if a.seconds is None else t0 + a.seconds
    jobs = [(a.seed, j, a.jobs, (a.cases, until), str(a.keep) if a.keep else None) for j in range(a.jobs)]
    if a.jobs == 1:
        results = [_worker(jobs[0])]
    else:
        with mp.Pool(a.jobs) as pool:
            results = pool.map(_worker, jobs)
    dt = time.time() - t0
    total = sum(n for n, _, _ in results)
    counts: collections.Counter = collections.Counter()
    fails: list[str] = []
    for _, c, f in results:
        counts.update(c)
        fails += f
    print(f"{total:,} mutated datasets in {dt:,.0f} s ({total / max(dt, 1e-9):,.0f}/s, {a.jobs} process(es), seed {a.seed})")
    for outcome, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>9,}  {outcome}")
    print(f"failures: {len(fails)}")
    for f in fails[:20]:
        print(f)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
