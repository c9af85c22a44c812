"""Several processes read one dataset while `pairpack verify` runs (issue 6).

Readers take no lock and write nothing: every process sees the same pairs and batches, verify
passes meanwhile, and afterwards no file of the dataset has changed (bytes, size, mtime) and no
file was added.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import pairpack
from pairpack import format as fmt

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# Reads every pair and batches of every pair (in a seeded random order), several rounds, and
# prints one digest of everything it read.
READER = r"""
import sys, numpy as np, xxhash, pairpack
ds = pairpack.open(sys.argv[1])
h = xxhash.xxh3_128()
for rnd in range(int(sys.argv[2])):
    for i in range(len(ds)):
        for seg in ds[i]:
            h.update(np.ascontiguousarray(seg).tobytes())
    order = np.random.default_rng(rnd).permutation(len(ds))
    for a in range(0, len(ds), 64):
        b = ds.batch(order[a:a + 64], columns=["score"])
        for t in (b.preferred_seq, b.unpreferred_seq, b.prompt_mask, b.preferred_seq_mask,
                  b.unpreferred_seq_mask, b.columns["score"]):
            h.update(t.numpy().tobytes())
    h.update(ds.lengths.tobytes())
print(h.hexdigest())
"""


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, fmt.file_checksum(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_readers_and_verify_concurrently(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    with pairpack.Writer(root, vocab_size=50_000, pad_id=0, shard_bytes=64 << 10,
                         columns={"score": "float32"}) as w:
        for j in range(3000):
            prompt = [j % 97 + 1] * int(rng.integers(1, 40))
            w.add(prompt, rng.integers(0, 50_000, int(rng.integers(1, 60))),
                  rng.integers(0, 50_000, int(rng.integers(1, 60))), score=float(j) / 7)
    assert len(pairpack.open(root).manifest.shards) > 3
    before = _snapshot(root)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(root), "3"], env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    verifiers = [subprocess.Popen([sys.executable, "-m", "pairpack.cli", "verify", str(root)], env=ENV,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in readers]
    vouts = [p.communicate(timeout=300) for p in verifiers]
    assert all(p.returncode == 0 for p in readers), [e for _, e in outs]
    assert all(p.returncode == 0 for p in verifiers), [e for _, e in vouts]
    assert all("OK (3,000 pairs" in o for o, _ in vouts)
    digests = {o.strip() for o, _ in outs}
    local = subprocess.run([sys.executable, "-c", READER, str(root), "3"], env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert len(digests) == 1 and digests == {local.stdout.strip()}
    assert _snapshot(root) == before  # nothing modified, nothing added


def test_verify_reports_progress_per_file(tmp_path):
    """verify_dataset's on_file callback sees every shard file once, with its manifest size (the
    CLI draws its progress bar from it)."""
    from pairpack.read.verify import verify_dataset

    with pairpack.Writer(tmp_path / "ds", shard_bytes=64, columns={"score": "float32"}) as w:
        for i in range(20):
            w.add([1, 2, 3, i], [4, 5], [6, 7, 8], score=float(i))
    m = pairpack.open(tmp_path / "ds").manifest
    seen: list[int] = []
    assert verify_dataset(tmp_path / "ds", on_file=seen.append) == []
    expected = [e.bytes for s in m.shards for e in list(s.files.values()) + list(s.columns.values())]
    assert len(m.shards) > 1 and sorted(seen) == sorted(expected)
