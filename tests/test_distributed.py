"""A real two-process torch.distributed run (gloo, CPU): ranks take their share from the process
group, all-gather the pair indices they saw, and check disjointness, coverage and equal counts."""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import pairpack
from pairpack.batch.loader import Loader

WORLD = 2
CASES = [
    {"batch_size": 7},  # 61 pairs: DistributedSampler pads one pair
    {"batch_size": 7, "drop_last": True},
    {"max_tokens": 300, "group_by_length": True, "max_length": 40},
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = []
        for case in CASES:
            ld = Loader(path, seed=11, **case)  # rank and world size come from the process group
            assert (ld.rank, ld.world_size) == (rank, WORLD)
            for epoch in (0, 1):
                ld.set_epoch(epoch)
                seen, batches = [], 0
                for b in ld:
                    seen += b.indices.tolist()
                    batches += 1
                    dist.barrier()  # a collective per step: hangs (then times out) if counts differ
                gathered: list = [None] * WORLD
                dist.all_gather_object(gathered, {"seen": seen, "batches": batches, "len": len(ld)})
                results.append({"case": case, "epoch": epoch, "ranks": gathered})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_partition_every_epoch(tmp_path):
    rng = np.random.default_rng(3)
    with pairpack.Writer(tmp_path / "ds", vocab_size=100) as w:
        for _ in range(61):
            w.add(rng.integers(1, 100, rng.integers(1, 30)), rng.integers(1, 100, rng.integers(1, 30)),
                  rng.integers(1, 100, rng.integers(1, 30)))
    out = tmp_path / "result.json"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path / "ds"), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed loader run did not finish in 120 s")
    finally:
        for p in ctx.processes:  # never leave a rank behind, whatever happened
            if p.is_alive():
                p.kill()
    results = json.loads(out.read_text())
    assert len(results) == 2 * len(CASES)
    n = 61
    for res in results:
        r0, r1 = res["ranks"]
        assert r0["batches"] == r1["batches"] == r0["len"] == r1["len"] > 0
        both = r0["seen"] + r1["seen"]
        if res["case"].get("drop_last"):
            assert not set(r0["seen"]) & set(r1["seen"])
            assert len(both) == len(set(both)) == n - n % WORLD - WORLD * ((n // WORLD) % 7)
        elif "batch_size" in res["case"]:
            # DistributedSampler padding: 62 slots, one pair repeated, union = the epoch
            assert len(both) == 62 and set(both) == set(range(n))
        else:
            assert not set(r0["seen"]) & set(r1["seen"])
            assert sorted(both) == list(range(n))
    # the epochs differ
    assert results[0]["ranks"][0]["seen"] != results[1]["ranks"][0]["seen"]
