"""tools/bench_train_step.py and tools/gpu_layouts.py run (tiny sizes on the CPU) and skip cleanly
without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bench_train_step_quick():
    proc = _run("tools/bench_train_step.py", "--quick", "--sets", "hh", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["layout"] for r in rows] == ["padded", "packed", "prefix_shared"]
    assert rows[0]["speedup"] == 1.0
    shared = rows[2]
    assert shared["tokens_per_pair"] < rows[0]["tokens_per_pair"]  # each prompt once per pair
    assert all(r["max_logp_diff"] < 1e-3 and r["ms_per_step"] > 0 for r in rows)


def test_gpu_layouts_skips_without_cuda_and_runs_its_cpu_smoke():
    if not torch.cuda.is_available():
        proc = _run("tools/gpu_layouts.py")
        assert proc.returncode == 0 and proc.stdout.startswith("SKIP gpu_layouts: no CUDA device"), proc.stdout
    proc = _run("tools/gpu_layouts.py", "--cpu-smoke", "--sets", "hh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[hh] prefix_shared: max relative |logp - padded logp|" in out and "(ok)" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith("hh ")]
    assert [t[1] for t in table] == ["padded", "packed", "prefix_shared"]
