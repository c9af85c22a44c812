"""Benchmark ``pairpack.ray.build`` on a local Ray against ``pairpack build --workers N``, same run.

Generated text pairs (``bench_build.gen_text``: English-like words, log-normal lengths, ~575
GPT-2 tokens a pair), written as ``--files`` JSONL files (a corpus is many files; Ray splits
each into blocks of a few hundred rows, which the sink bundles into write tasks of 10,000 rows),
tokenized with the real GPT-2 tokenizer (../shared/tokenizers/gpt2.tokenizer.json). For N in 1 and 2:

  * Ray: ``ray.init(num_cpus=N)``, one small warm-up job (starts the worker processes, loads the
    tokenizer once in each), then the timed job: ``pairpack.ray.build(ray.data.read_json(dir),
    out, tokenizer=gpt2)``, its shape detection (the first 1,000 rows) included;
  * ``pairpack.build(dir, out, tokenizer=gpt2, workers=N)`` (the CLI's ``--workers N``).

Printed: pairs/s of wall time; scaling efficiency 1 -> 2 CPUs (rate at 2 / (2 x rate at 1));
Ray at 2 CPUs / build --workers 2. Targets (issue 14): efficiency >= 0.8, Ray >= 0.8x build.
Also pairs per CPU-second of the whole machine while the job ran (every process: Ray's raylet,
GCS, read and write tasks, the driver; the build and its workers), which shows the engine's cost
apart from how well it keeps the cores busy; other load counts too. Two last rows, at 2 CPUs:
``byte_identical=True`` (the driver re-writes the parts as one sequential build: a copy of the
tokens) and ``rows_per_task=None`` (a write task per Ray block, a few hundred rows each, as
before the default of 10,000 rows per task). The load average is printed before and after: rerun
when it is quiet.

Usage:
    python tools/bench_ray.py                       # 20k text pairs in 8 files
    python tools/bench_ray.py --pairs 5000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_build import GPT2, gen_text  # noqa: E402

from pairpack.ingest.build import build  # noqa: E402


CPU: dict[tuple[str, int], float] = {}  # (path, N) -> CPU seconds of its fastest timed run


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy() -> float:
    """Busy CPU-seconds of the whole machine so far (all processes; /proc/stat), NaN elsewhere."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


SPLIT: dict[int, dict[str, float]] = {}  # Ray, N CPUs -> fastest run's tasks, driver, machine, overlap


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _split(src: Path, out: Path, files: int) -> None:
    lines = src.read_bytes().splitlines(keepends=True)
    out.mkdir()
    step = -(-len(lines) // files)
    for k in range(files):
        (out / f"part-{k:03d}.jsonl").write_bytes(b"".join(lines[k * step:(k + 1) * step]))


def _best(fn, repeat: int) -> tuple[float, dict]:
    """Fastest wall time of ``repeat`` runs (the least disturbed by other load) and what that run's
    ``fn()`` returned (its CPU figures: every figure printed comes from the same run)."""
    best, figures = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = fn()
        t = time.perf_counter() - t0
        if t < best:
            best, figures = t, got
    return best, figures


def _import_fsspec() -> None:
    # Ray's JSON read tasks import fsspec from several threads at once, which fails now and then
    # ("partially initialized module 'fsspec'"); importing it when the worker starts avoids it
    import fsspec  # noqa: F401


def ray_rate(cpus: int, data: Path, work: Path, n: int, repeat: int, byte_identical: bool = False,
             per_block: bool = False) -> float:
    """pairs/s of ``pairpack.ray.build`` at ``cpus`` CPUs (its default ``rows_per_task``; ``per_block``:
    None, a task per Ray block)."""
    import ray

    import pairpack.ray as pray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False, runtime_env={"worker_process_setup_hook": _import_fsspec})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        files = sorted(str(p) for p in data.iterdir())
        # warm-up: worker processes started, tokenizer loaded in each (a task per block: every worker)
        pray.build(ray.data.read_json(files[:cpus]).limit(200 * cpus), work / "warm", tokenizer=GPT2, force=True,
                   rows_per_task=None)

        def run() -> dict:
            # what pairpack.ray.build does, through the sink (whose per-task figures hold the CPU time)
            ds = ray.data.read_json(files)
            t0, c0, m0 = time.perf_counter(), _cpu_self(), _machine_busy()
            s = pray.Datasink(work / "ray", tokenizer=GPT2, force=True, sample=ds.take(1000),
                              byte_identical=byte_identical,
                              **({"rows_per_task": None} if per_block else {}))
            ds.write_datasink(s)
            return {"sink": s, "driver": _cpu_self() - c0, "machine": _machine_busy() - m0,
                    "wall": time.perf_counter() - t0}

        t, run_ = _best(run, repeat)
        s = run_["sink"]
        assert s.report.pairs == n, s.report.summary()
        tasks = sum(x["cpu_seconds"] for x in s.tasks)
        key = "ray-byte-identical" if byte_identical else "ray-blocks" if per_block else "ray"
        CPU[(key, cpus)] = run_["machine"]
        if key == "ray":
            busy = sum(x["finished"] - x["started"] for x in s.tasks)
            span = max(x["finished"] for x in s.tasks) - min(x["started"] for x in s.tasks)
            SPLIT[cpus] = {"tasks": tasks, "driver": run_["driver"], "machine": run_["machine"],
                           "wall": run_["wall"], "overlap": busy / span if span > 0 else float("nan"),
                           "span": span, "workers": len({x["worker"] for x in s.tasks}), "ntasks": len(s.tasks)}
        return n / t
    finally:
        ray.shutdown()


def build_rate(workers: int, data: Path, work: Path, n: int, repeat: int) -> float:
    def run() -> dict:
        m0 = _machine_busy()
        rep = build([data], work / "pp", tokenizer=GPT2, workers=workers, force=True)
        return {"report": rep, "cpu": _machine_busy() - m0}

    t, run_ = _best(run, repeat)
    assert run_["report"].pairs == n
    CPU[("build", workers)] = run_["cpu"]
    return n / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per row; the fastest counts")
    args = ap.parse_args()
    if not GPT2.exists():
        sys.exit(f"{GPT2} not found (the real tokenizer this benchmark uses)")
    logging.getLogger("ray").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    load0 = _load()
    try:
        gen_text(work / "all.jsonl", args.pairs)
        _split(work / "all.jsonl", work / "data", args.files)
        rates = {}
        for n in (1, 2):
            rates[("ray", n)] = ray_rate(n, work / "data", work, args.pairs, args.repeat)
            rates[("build", n)] = build_rate(n, work / "data", work, args.pairs, args.repeat)
            print(json.dumps({"cpus": n, "ray": rates[("ray", n)], "build": rates[("build", n)],
                              "ray_cpu_s": CPU[("ray", n)], "build_cpu_s": CPU[("build", n)]}), flush=True)
        rates[("ray-byte-identical", 2)] = ray_rate(2, work / "data", work, args.pairs, args.repeat, True)
        rates[("ray-blocks", 2)] = ray_rate(2, work / "data", work, args.pairs, args.repeat, per_block=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    eff = {k: rates[(k, 2)] / (2 * rates[(k, 1)]) for k in ("ray", "build")}
    print(f"\n{args.pairs:,} text pairs (GPT-2) in {args.files} files; best of {args.repeat}; "
          f"load average {load0:.1f} before, {_load():.1f} after\n")
    per_cpu = {k: args.pairs / v for k, v in CPU.items()}
    print("| path | 1 CPU, pairs/s | 2 CPUs, pairs/s | scaling efficiency 1 -> 2 | pairs per machine CPU-s (1 / 2 CPUs) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `pairpack.ray.build`, local Ray `num_cpus=N` | {rates[('ray', 1)]:,.0f} | {rates[('ray', 2)]:,.0f} | "
          f"{eff['ray']:.2f} | {per_cpu[('ray', 1)]:,.0f} / {per_cpu[('ray', 2)]:,.0f} |")
    print(f"| `pairpack build --workers N` | {rates[('build', 1)]:,.0f} | {rates[('build', 2)]:,.0f} | "
          f"{eff['build']:.2f} | {per_cpu[('build', 1)]:,.0f} / {per_cpu[('build', 2)]:,.0f} |")
    print(f"| `pairpack.ray.build(..., byte_identical=True)` | | {rates[('ray-byte-identical', 2)]:,.0f} | | "
          f"- / {per_cpu[('ray-byte-identical', 2)]:,.0f} |")
    print(f"| `pairpack.ray.build(..., rows_per_task=None)` (a task per Ray block) | | {rates[('ray-blocks', 2)]:,.0f} | | "
          f"- / {per_cpu[('ray-blocks', 2)]:,.0f} |")
    print("\nCPU-seconds of the fastest timed Ray run: write tasks (their reads are separate tasks when Ray "
          "bundles blocks into tasks of rows_per_task) / driver / the whole machine "
          "(every process: Ray's raylet, GCS and workers' own threads too; other load counts here)")
    for k, v in sorted(SPLIT.items()):
        print(f"  {k} CPU{'s' if k > 1 else ''}: {v['tasks']:.1f} / {v['driver']:.1f} / {v['machine']:.1f} in "
              f"{v['wall']:.1f} s; {v['ntasks']} write tasks on {v['workers']} worker processes, running "
              f"{v['overlap']:.2f} at a time on average over the {v['span']:.1f} s from the first start to the last end")
    print(f"\nRay at 2 CPUs / build --workers 2: {rates[('ray', 2)] / rates[('build', 2)]:.2f} "
          f"(target >= 0.8); Ray scaling efficiency {eff['ray']:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
