#!/usr/bin/env python
"""Reader benchmark: pairpack batches vs Hugging Face datasets, a naive memory-mapped loop, and the
memory-bandwidth bound, all on the same generated data in one run (ratios, never absolute targets).

    python tools/bench_reader.py            # 200k pairs, ~2-3 min on 2 cores
    python tools/bench_reader.py --quick    # 20k pairs, well under a minute

Data: log-normal lengths (medians 180 prompt / 220 chosen / 220 rejected tokens, sigma 0.6, cut
at 4096), uniform ids below a 50k vocabulary, written once into a temp dir in the pairpack format
and as a Hugging Face dataset (``save_to_disk``, then ``load_from_disk``: memory-mapped Arrow).
Every path produces the same triplets for the same random batches of 32 (checked on the first
batch): int64 ``(B, L)`` preferred/unpreferred rows, bool prompt and sequence masks.

Rows of the table:
  copy bound        one contiguous copy of the batch's output bytes (2 int64 rows + 3 bool masks)
  pairpack ds.batch ``Dataset.batch(indices)``
  pairpack Loader   ``Loader(batch_size=32)`` iteration (epoch planning included, random order)
  naive mmap loop   per pair: np.concatenate of memory-mapped slices, then pad into the batch
  HF list collator  ``ds[idx]`` to Python lists + a TRL-style collator (tensor per row, pad)
  HF numpy format   ``with_format("numpy")`` rows, copied into a padded numpy batch
  HF Arrow gather   Arrow offsets/values as numpy (zero-copy), one fancy-index gather per batch
Also: open time and resident memory of a 10M-pair dataset (opened in a fresh process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pairpack  # noqa: E402
from pairpack import format as fmt  # noqa: E402

VOCAB, PAD, B = 50_000, 0, 32


# --- data ----------------------------------------------------------------------------------------
def lognormal_lengths(n: int, rng: np.random.Generator, sigma: float = 0.6) -> np.ndarray:
    """int64 (3, n): prompt/chosen/rejected lengths, medians 180/220/220, clipped to [1, 4096]."""
    med = np.array([180.0, 220.0, 220.0])[:, None]
    return np.clip(np.rint(med * np.exp(sigma * rng.standard_normal((3, n)))), 1, 4096).astype(np.int64)


def write_direct(path: Path, lengths: np.ndarray, tokens: np.ndarray | None) -> None:
    """Write a one-shard pairpack dataset straight in the format (FORMAT.md §3-§6).

    Segments are laid out prompt, chosen, rejected per pair; with ``tokens=None`` every segment
    points at the start of a tiny shared token array (for the 10M-pair open test, where only the
    index arrays matter).
    """
    n = lengths.shape[1]
    shard = path / "shard-00000"
    shard.mkdir(parents=True)
    if tokens is None:
        tokens = np.arange(1, int(lengths.max()) + 1, dtype=np.uint16)
        starts = np.zeros((3, n), dtype=np.int64)
    else:
        ends = np.cumsum(lengths.T.reshape(-1))
        starts = (ends - lengths.T.reshape(-1)).reshape(n, 3).T.copy()
    files = {}
    for key, name, arr in (("tokens", fmt.TOKENS_FILE, tokens), ("starts", fmt.STARTS_FILE, starts),
                           ("lengths", fmt.LENGTHS_FILE, lengths)):
        p = shard / name
        with open(p, "wb") as f:
            f.write(fmt.npy_header(arr.dtype, arr.shape))
            f.write(np.ascontiguousarray(arr).data)
        files[key] = fmt.FileEntry(f"shard-00000/{name}", p.stat().st_size, fmt.file_checksum(p))
    num_prompts = len(np.unique(starts[0]))  # distinct prompt starts (FORMAT.md §8 R15)
    info = fmt.ShardInfo("shard-00000", n, len(tokens), num_prompts, files)
    m = fmt.Manifest(num_pairs=n, token_dtype="uint16", vocab_size=VOCAB, pad_id=PAD, bos_id=None, eos_id=None,
                     tokenizer=None, shards=(info,), provenance={"generator": "tools/bench_reader.py"})
    (path / fmt.MANIFEST_NAME).write_bytes(m.dumps())


def write_hf(path: Path, ds: "pairpack.Dataset") -> None:
    """The same pairs as a Hugging Face dataset (list<int32> columns), via Arrow buffers (no lists)."""
    import datasets
    import pyarrow as pa

    tok = np.asarray(ds._live()[0].tokens)
    st, ln = np.asarray(ds._live()[0].starts), np.asarray(ds.lengths)
    cols = {}
    for k, name in enumerate(("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")):
        # every segment is contiguous in tokens: one gather gives the concatenated values
        idx = np.repeat(st[k] - np.concatenate([[0], np.cumsum(ln[k])[:-1]]), ln[k]) + np.arange(int(ln[k].sum()))
        offsets = np.concatenate([[0], np.cumsum(ln[k])]).astype(np.int32)
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tok[idx].astype(np.int32)))
    hf = datasets.Dataset(pa.table(cols))
    hf.save_to_disk(str(path))


# --- the paths ---------------------------------------------------------------------------------------
def trl_collate(examples: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """A TRL-style preference collator: per example tensors, then pad, masks from lengths."""
    pref = [torch.tensor(e["prompt_input_ids"] + e["chosen_input_ids"]) for e in examples]
    unpref = [torch.tensor(e["prompt_input_ids"] + e["rejected_input_ids"]) for e in examples]
    plen = torch.tensor([len(e["prompt_input_ids"]) for e in examples])
    L = max(max(len(x) for x in pref), max(len(x) for x in unpref))
    p_seq = torch.full((len(examples), L), pad, dtype=torch.int64)
    u_seq = torch.full((len(examples), L), pad, dtype=torch.int64)
    for i, (a, b) in enumerate(zip(pref, unpref)):
        p_seq[i, : len(a)] = a
        u_seq[i, : len(b)] = b
    pos = torch.arange(L)
    return {"preferred_seq": p_seq, "unpreferred_seq": u_seq, "prompt_mask": pos < plen[:, None],
            "preferred_seq_mask": pos < torch.tensor([len(a) for a in pref])[:, None],
            "unpreferred_seq_mask": pos < torch.tensor([len(b) for b in unpref])[:, None]}


def hf_lists(hf, idx: np.ndarray) -> dict[str, torch.Tensor]:
    rows = hf[idx.tolist()]  # dict of columns -> lists of lists
    keys = list(rows)
    return trl_collate([dict(zip(keys, vals)) for vals in zip(*rows.values())], PAD)


def hf_numpy(hf_np, idx: np.ndarray) -> dict[str, torch.Tensor]:
    rows = hf_np[idx.tolist()]
    p, c, r = rows["prompt_input_ids"], rows["chosen_input_ids"], rows["rejected_input_ids"]
    pl = np.fromiter((len(x) for x in p), np.int64, len(p))
    cl = np.fromiter((len(x) for x in c), np.int64, len(c))
    rl = np.fromiter((len(x) for x in r), np.int64, len(r))
    L = int(max((pl + cl).max(), (pl + rl).max()))
    out = np.full((2, len(p), L), PAD, dtype=np.int64)
    for i in range(len(p)):
        out[0, i, : pl[i]] = p[i]
        out[0, i, pl[i]: pl[i] + cl[i]] = c[i]
        out[1, i, : pl[i]] = p[i]
        out[1, i, pl[i]: pl[i] + rl[i]] = r[i]
    return _finish(torch.from_numpy(out), pl, pl + cl, pl + rl)


class ArrowGather:
    """Arrow list columns as (values, offsets) numpy views; one vectorised gather per batch."""

    def __init__(self, hf) -> None:
        table = hf.data.table.combine_chunks()
        self.cols = []
        for name in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            arr = table.column(name).chunk(0)
            off = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
            vals = np.frombuffer(arr.buffers()[3], dtype=np.int32)
            self.cols.append((vals, off.astype(np.int64)))

    def __call__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        (pv, po), (cv, co), (rv, ro) = self.cols
        ps, pl = po[idx], po[idx + 1] - po[idx]
        lens = [(cv, co[idx], co[idx + 1] - co[idx]), (rv, ro[idx], ro[idx + 1] - ro[idx])]
        L = int(max((pl + lens[0][2]).max(), (pl + lens[1][2]).max()))
        pos = np.arange(L)[None, :]
        out = np.full((2, len(idx), L), PAD, dtype=np.int64)
        in_p = pos < pl[:, None]
        for side, (v, s, n) in enumerate(lens):
            in_c = (pos >= pl[:, None]) & (pos < (pl + n)[:, None])
            out[side][in_p] = pv[(ps[:, None] + pos)[in_p]]
            out[side][in_c] = v[(s[:, None] + pos - pl[:, None])[in_c]]
        return _finish(torch.from_numpy(out), pl, pl + lens[0][2], pl + lens[1][2])


def naive_mmap(arrs: tuple[np.ndarray, np.ndarray, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    tok, st, ln = arrs
    rows = []
    for i in idx.tolist():
        p = tok[st[0, i]: st[0, i] + ln[0, i]]
        rows.append((np.concatenate([p, tok[st[1, i]: st[1, i] + ln[1, i]]]),
                     np.concatenate([p, tok[st[2, i]: st[2, i] + ln[2, i]]]), len(p)))
    L = max(max(len(a), len(b)) for a, b, _ in rows)
    out = np.full((2, len(rows), L), PAD, dtype=np.int64)
    for j, (a, b, _) in enumerate(rows):
        out[0, j, : len(a)] = a
        out[1, j, : len(b)] = b
    pl = np.array([p for _, _, p in rows])
    return _finish(torch.from_numpy(out), pl, np.array([len(a) for a, _, _ in rows]),
                   np.array([len(b) for _, b, _ in rows]))


def _finish(seqs: torch.Tensor, pl: np.ndarray, tc: np.ndarray, tr: np.ndarray) -> dict[str, torch.Tensor]:
    pos = torch.arange(seqs.shape[-1])
    return {"preferred_seq": seqs[0], "unpreferred_seq": seqs[1],
            "prompt_mask": pos < torch.from_numpy(np.asarray(pl))[:, None],
            "preferred_seq_mask": pos < torch.from_numpy(np.asarray(tc))[:, None],
            "unpreferred_seq_mask": pos < torch.from_numpy(np.asarray(tr))[:, None]}


def copy_bound(batches: list[np.ndarray], lengths: np.ndarray):
    """A repeat that makes one contiguous copy of each batch's output bytes (allocation included)."""
    sizes = []
    for idx in batches:
        L = int(max((lengths[0, idx] + lengths[1, idx]).max(), (lengths[0, idx] + lengths[2, idx]).max()))
        sizes.append(len(idx) * L * (2 * 8 + 3))  # two int64 rows + three bool masks
    src = torch.ones(max(sizes), dtype=torch.uint8)

    def rep() -> None:
        for n in sizes:
            out = torch.empty(n, dtype=torch.uint8)
            out.copy_(src[:n])
            del out

    return rep


# --- timing -------------------------------------------------------------------------------------------
def timed(rep, k: int, min_seconds: float) -> float:
    """Seconds per batch: the fastest of repeated runs of ``rep()`` (``k`` batches each).

    The machine this runs on is shared, so the best repeat (as ``timeit`` advises) is the figure
    least disturbed by other processes; every path is timed the same way on the same batches.
    """
    rep()  # warm-up: page cache, allocator, imports
    best = float("inf")
    t_end = time.perf_counter() + min_seconds
    reps = 0
    while reps < 2 or time.perf_counter() < t_end:
        gc.collect()
        t0 = time.perf_counter()
        rep()
        best = min(best, time.perf_counter() - t0)
        reps += 1
        if reps >= 2 and best * 3 > min_seconds:  # slow paths: two repeats are enough
            break
    return best / k


def open_10m(tmp: Path, n: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 4, size=(3, n), dtype=np.int64)
    path = tmp / "ten_million"
    t = time.perf_counter()
    write_direct(path, lengths, None)
    del lengths
    write_s = time.perf_counter() - t
    code = (
        "import sys, time, json\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import numpy, pairpack, pairpack.read.dataset\n"
        "r0 = rss(); t = time.perf_counter()\n"
        f"ds = pairpack.open({str(path)!r})\n"
        "t1 = time.perf_counter() - t; r1 = rss()\n"
        "pair = ds[len(ds) // 2]; r2 = rss()\n"
        "print(json.dumps({'pairs': len(ds), 'open_ms': t1 * 1e3, 'rss_open_mb': (r1 - r0) / 2**20,"
        " 'rss_after_read_mb': (r2 - r0) / 2**20}))\n"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    res["write_s"] = write_s
    res["index_mb"] = sum(f.stat().st_size for f in path.rglob("*.npy")) / 2**20
    shutil.rmtree(path)
    return res


def _smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def worker_memory(ds: "pairpack.Dataset", batches: int = 300) -> list[tuple[int, float, float]]:
    """(num_workers, total PSS MB of the loader process + workers, workers' private dirty MB)
    while a Loader iterates: the maps are shared, so memory should stay flat as workers grow."""
    import warnings

    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 4 workers on 2 cores, on purpose
    out = []
    for k in (0, 1, 2, 4):
        it = iter(pairpack.Loader(ds, batch_size=B, num_workers=k, seed=0))
        for _, b in zip(range(batches), it):
            del b
        pids = _children(os.getpid())
        pss = sum(_smaps(p).get("Pss", 0) for p in [os.getpid(), *pids])
        dirty = sum(_smaps(p).get("Private_Dirty", 0) for p in pids)
        out.append((k, pss / 2**20, dirty / 2**20))
        del it
        gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="20k pairs, shorter timings, 1M-pair open test")
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per path (best of repeats)")
    ap.add_argument("--batches", type=int, default=256, help="random batches of 32 timed per repeat")
    ap.add_argument("--open-pairs", type=int, default=10_000_000)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.seconds, args.open_pairs = 20_000, 1.0, 1_000_000
    torch.set_num_threads(1)  # every path single-threaded: the loader's per-process cost
    tmp = Path(tempfile.mkdtemp(prefix="pairpack-bench-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    rng = np.random.default_rng(0)
    n = args.pairs
    t = time.perf_counter()
    lengths = lognormal_lengths(n, rng)
    tokens = rng.integers(1, VOCAB, int(lengths.sum()), dtype=np.uint16)
    write_direct(tmp / "pp", lengths, tokens)
    del tokens
    ds = pairpack.open(tmp / "pp")
    problems = ds.verify()
    if problems:
        raise SystemExit(f"generated dataset is not sound: {problems[:3]}")
    print(f"data: {n} pairs, {int(lengths.sum()):,} tokens, written in {time.perf_counter() - t:.1f}s; "
          f"torch threads 1, batch {B}, random order", flush=True)
    batches = [rng.choice(n, B, replace=False) for _ in range(args.batches)]
    real = lambda bs: float(np.mean([(2 * lengths[0, b] + lengths[1, b] + lengths[2, b]).sum() for b in bs]))

    sh = ds._live()[0]
    arrs = (sh.tokens, np.asarray(sh.starts), np.asarray(sh.lengths))
    ref = ds.batch(batches[0])

    def same(out: dict[str, torch.Tensor], name: str) -> None:
        for k, v in ref.as_kwargs().items():
            if not torch.equal(out[k], v):
                raise SystemExit(f"{name}: {k} differs from pairpack's batch")

    def over(fn):
        def rep() -> None:
            for idx in batches:
                out = fn(idx)
                del out  # as in a training step: a batch is dropped before the next one is made
        return rep

    def loader_rep() -> None:
        # as over(): each batch dropped before the next is made (zip would hold the previous one
        # in its reused result tuple while the next is assembled)
        it = iter(loader)
        for _ in range(len(batches)):
            b = next(it)
            del b

    same(naive_mmap(arrs, batches[0]), "naive mmap loop")
    paths: dict[str, tuple] = {}
    paths["copy bound (1 contiguous copy)"] = (copy_bound(batches, lengths), real(batches))
    paths["pairpack ds.batch"] = (over(ds.batch), real(batches))
    loader = pairpack.Loader(ds, batch_size=B, seed=0)
    first = [b.indices.numpy() for _, b in zip(range(len(batches)), loader)]
    # the Loader draws its own random batches (same distribution): the first ones of epoch 0
    paths["pairpack Loader"] = (loader_rep, real(first))
    paths["naive mmap loop"] = (over(lambda idx: naive_mmap(arrs, idx)), real(batches))
    if not args.no_hf:
        import datasets

        t = time.perf_counter()
        write_hf(tmp / "hf", ds)
        hf = datasets.load_from_disk(str(tmp / "hf"))
        print(f"HF dataset saved and loaded in {time.perf_counter() - t:.1f}s", flush=True)
        hf_np = hf.with_format("numpy")
        gather = ArrowGather(hf)
        same(hf_lists(hf, batches[0]), "HF list collator")
        same(hf_numpy(hf_np, batches[0]), "HF numpy format")
        same(gather(batches[0]), "HF Arrow gather")
        paths["HF list collator (TRL-style)"] = (over(lambda idx: hf_lists(hf, idx)), real(batches))
        paths["HF with_format('numpy')"] = (over(lambda idx: hf_numpy(hf_np, idx)), real(batches))
        paths["HF Arrow buffers + numpy gather"] = (over(gather), real(batches))

    results, tokens = {}, {}
    for name, (rep, tok) in paths.items():
        results[name], tokens[name] = timed(rep, len(batches), args.seconds), tok
        print(f"  timed {name}", flush=True)
    bound = results["copy bound (1 contiguous copy)"]
    print()
    print(f"| path | batches/s | pairs/s | real tokens/s | share of copy bound |")
    print(f"|---|---:|---:|---:|---:|")
    for name, per in results.items():
        print(f"| {name} | {1 / per:,.0f} | {B / per:,.0f} | {tokens[name] / per / 1e6:,.1f} M | {bound / per:.0%} |")
    pp = results["pairpack ds.batch"]
    ld = results["pairpack Loader"]
    print()
    ratios = [("naive mmap loop", results["naive mmap loop"])]
    if not args.no_hf:
        hf_keys = [k for k in results if k.startswith("HF")]
        best = min(hf_keys, key=lambda k: results[k])
        ratios += [("HF list collator", results["HF list collator (TRL-style)"]), (f"best HF ({best})", results[best])]
    for label, per in ratios:
        print(f"pairpack ds.batch / Loader vs {label}: {per / pp:.1f}x / {per / ld:.1f}x")
    from pairpack.batch.plan import padding_ceiling

    ceil = padding_ceiling(lengths)
    effs = []
    for label, kw in (("random, batch 32", {"batch_size": B}), ("grouped, batch 32", {"batch_size": B, "group_by_length": True}),
                      ("random, max_tokens 65536", {"max_tokens": 65536}),
                      ("grouped, max_tokens 65536", {"max_tokens": 65536, "group_by_length": True})):
        eff = pairpack.Loader(ds, **kw).padding_efficiency()
        effs.append(f"{label} {eff:.1%} ({eff / ceil:.0%} of ceiling)")
    print(f"\npadding efficiency (real / padded tokens, both rows; ceiling {ceil:.1%}): " + "; ".join(effs))
    mem = worker_memory(ds)
    print("memory while a Loader iterates (PSS of loader + workers; workers' private dirty): " + "; ".join(
        f"{k} workers {pss:,.0f} MB ({dirty:,.0f} MB)" for k, pss, dirty in mem))
    o = open_10m(tmp, args.open_pairs)
    print(f"\nopen: {o['pairs']:,} pairs ({o['index_mb']:.0f} MB of index files, written in {o['write_s']:.1f}s): "
          f"pairpack.open {o['open_ms']:.1f} ms, RSS +{o['rss_open_mb']:.1f} MB after open, "
          f"+{o['rss_after_read_mb']:.1f} MB after reading one pair (fresh process)")


if __name__ == "__main__":
    main()
