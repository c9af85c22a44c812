"""How close `pairpack verify` runs to disk speed (issue 6).

Builds (once, or reuses) a dataset of about ``--gb`` GB of tokens, then measures in the same run:

* baseline: reading every file of the dataset in 16 MiB chunks and doing nothing with the bytes;
* ``verify_dataset`` (xxh3-128 of every file, every invariant of §8 R10-R16).

Each is measured warm (files in the page cache) and, when this process may drop the page cache
(root on Linux), cold. Prints MB/s and the ratio verify / baseline.

    python tools/bench_verify.py [--path /tmp/pairpack-bench-1g] [--gb 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pairpack  # noqa: E402
from pairpack.read.verify import verify_dataset  # noqa: E402


def make(path: Path, gb: float) -> None:
    """About ``gb`` GB of uint16 tokens: pairs of 50-600 prompt and 200-1500 completion tokens."""
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 50_000, size=1 << 24)
    total, n = 0, 0
    with pairpack.Writer(path, vocab_size=50_000, pad_id=0, force=True, shard_bytes=256 << 20) as w:
        while total * 2 < gb * 1e9:
            if n % 2 == 0:  # every prompt is shared by two pairs
                a = int(rng.integers(0, len(pool) - 5000))
                prompt = pool[a:a + int(rng.integers(50, 600))]
            cl, rl = (int(x) for x in rng.integers(200, 1500, 2))
            b = int(rng.integers(0, len(pool) - 5000))
            w.add_checked(prompt, pool[b:b + cl], pool[b + cl:b + cl + rl])
            total += len(prompt) + cl + rl
            n += 1


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=Path("/tmp/pairpack-bench-1g"))
    ap.add_argument("--gb", type=float, default=1.0)
    a = ap.parse_args()
    if not (a.path / "manifest.json").exists():
        t = time.perf_counter()
        make(a.path, a.gb)
        print(f"built {a.path} in {time.perf_counter() - t:.1f} s")
    files = sorted(p for p in a.path.rglob("*") if p.is_file())
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"{a.path}: {len(pairpack.open(a.path)):,} pairs, {mb:,.0f} MB in {len(files)} files")
    modes = ["cold", "warm"] if drop_caches() else ["warm"]
    for mode in modes:
        times = {}
        for name, fn in (("read (baseline)", lambda: read_all(files)), ("verify", lambda: verify_dataset(a.path))):
            if mode == "cold":
                drop_caches()
            else:
                read_all(files)  # warm the cache
            t = time.perf_counter()
            out = fn()
            times[name] = time.perf_counter() - t
            if name == "verify" and out:
                raise SystemExit(f"verify found problems: {out[:3]}")
        base, ver = times["read (baseline)"], times["verify"]
        print(f"{mode:>5}: read {mb / base:8,.0f} MB/s   verify {mb / ver:8,.0f} MB/s   "
              f"verify/read speed = {base / ver:.2f}")


if __name__ == "__main__":
    main()
