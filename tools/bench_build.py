"""Benchmark `pairpack build` against the baselines of issue 5, all measured in this run.

Generated data (seeded): ``--pairs`` pre-tokenized pairs with log-normal segment lengths (median
about 600 tokens a pair: prompt ~300, each completion ~150), written as JSONL and .jsonl.zst;
``--text-pairs`` text pairs (English-like words, the same length law in GPT-2 tokens).

Rows (pairs/s; ratio = pairpack / baseline):
  * pre-tokenized .jsonl: pairpack build (--workers = all cores) vs a pure orjson parse of the same
    file on one core (read + ``orjson.loads`` per line, nothing else) and vs Hugging Face
    ``datasets`` (``Dataset.from_json`` + ``save_to_disk``, its own multi-threaded Arrow reader);
  * the same for .jsonl.zst (decompression included in every contender);
  * text with the real GPT-2 tokenizer (../shared/tokenizers/gpt2.tokenizer.json): pairpack build
    vs the tokenizer's own ``encode_batch`` over the same prompt/chosen/rejected texts on all cores
    (Rust threads; JSON parsing not included in the baseline).

Targets (issue 5): pre-tokenized >= 2x datasets and >= 50% of the one-core parse rate per core;
text >= 80% of encode_batch on all cores.

Usage:
    python tools/bench_build.py                   # 200k pre-tokenized pairs, 20k text pairs
    python tools/bench_build.py --pairs 50000 --text-pairs 5000 --keep /tmp/bb
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pairpack.ingest.build import build  # noqa: E402

GPT2 = ROOT.parent / "shared" / "tokenizers" / "gpt2.tokenizer.json"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out up about who "
         "into them then some what could time only new other these two may first any like now my such make over our "
         "even most me state after also made many did must before back see through way where get much go well your "
         "know should down work year because come people just say each those take day good how long little use "
         "model data training preference reward policy gradient token sequence batch loss answer question please "
         "thanks sorry however therefore example explain write code python function value return error file").split()


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float = 0.6) -> np.ndarray:
    return np.maximum(1, rng.lognormal(np.log(median), sigma, n)).astype(np.int64)


def gen_ids(path: Path, n: int, seed: int = 0, vocab: int = 50257) -> int:
    """JSONL of n pre-tokenized pairs; returns total tokens."""
    rng = np.random.default_rng(seed)
    pl, cl, rl = (lognormal_lengths(rng, n, m) for m in (300, 150, 150))
    total = int(pl.sum() + cl.sum() + rl.sum())
    toks = rng.integers(0, vocab, total, dtype=np.int64)
    off = 0
    with open(path, "wb") as f:
        buf = []
        for i in range(n):
            a, b, c = int(pl[i]), int(cl[i]), int(rl[i])
            rec = {"prompt": toks[off:off + a], "chosen": toks[off + a:off + a + b],
                   "rejected": toks[off + a + b:off + a + b + c]}
            off += a + b + c
            buf.append(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
            if len(buf) >= 4096:
                f.write(b"".join(buf))
                buf = []
        f.write(b"".join(buf))
    return total


def gen_text(path: Path, n: int, seed: int = 1) -> None:
    """JSONL of n text pairs; about 1.3 words per GPT-2 token is undone by using ~0.8 words/token."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pl, cl, rl = (lognormal_lengths(rng, n, m * 0.8) for m in (300, 150, 150))
    with open(path, "wb") as f:
        for i in range(n):
            rec = {k: " ".join(words[rng.integers(0, len(words), int(L))]).capitalize() + "."
                   for k, L in (("prompt", pl[i]), ("chosen", cl[i]), ("rejected", rl[i]))}
            f.write(orjson.dumps(rec) + b"\n")


def zst(src: Path, dst: Path) -> None:
    import zstandard

    with open(src, "rb") as a, open(dst, "wb") as b:
        zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(a, b)


CPU: dict[str, float] = {}  # contender -> CPU seconds (this process and its children) of its last run


def _cpu() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def time_it(fn, name: str = "") -> float:
    """Wall seconds of fn(); its CPU seconds (threads and waited-for child processes included) go
    to CPU[name]: on a shared machine, pairs per CPU-second is the load-independent figure."""
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    CPU[name] = _cpu() - c0
    return wall


def orjson_parse(path: Path) -> int:
    """The one-core parse baseline: every line through orjson.loads, decompressing .zst."""
    import io

    import zstandard

    n = 0
    with open(path, "rb") as raw:
        f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20) \
            if path.name.endswith(".zst") else raw
        for line in f:
            orjson.loads(line)
            n += 1
    return n


def hf_datasets(path: Path, out: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    cache = out.parent / "hf-cache"
    ds = datasets.Dataset.from_json(str(path), cache_dir=str(cache))
    ds.save_to_disk(str(out))
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)


def encode_batch_all_cores(path: Path, tok) -> int:
    texts = []
    with open(path, "rb") as f:
        for line in f:
            r = orjson.loads(line)
            texts += [r["prompt"], r["chosen"], r["rejected"]]
    t0 = time.perf_counter()
    for i in range(0, len(texts), 3 * 1024):
        tok.encode_batch(texts[i:i + 3 * 1024], add_special_tokens=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200_000, help="pre-tokenized pairs (default 200k)")
    ap.add_argument("--text-pairs", type=int, default=20_000, help="text pairs for the tokenizer rows (default 20k)")
    ap.add_argument("--workers", type=int, default=None, help="pairpack --workers (default: all cores)")
    ap.add_argument("--no-datasets", action="store_true", help="skip the Hugging Face datasets baseline")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or cores
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_build-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        jl = work / "ids.jsonl"
        if not jl.exists():
            t = time.perf_counter()
            total = gen_ids(jl, args.pairs)
            print(f"generated {args.pairs:,} pairs, {total:,} tokens ({total / args.pairs:,.0f}/pair), "
                  f"{jl.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t:.1f} s", flush=True)
        z = work / "ids.jsonl.zst"
        if not z.exists():
            zst(jl, z)
        n = args.pairs
        for src in (jl, z):
            t_parse = time_it(lambda: orjson_parse(src), "orjson_1core")
            t_pp = time_it(lambda: build([src], work / "pp", force=True, vocab_size=50257, workers=workers),
                           "pairpack")
            row = {"input": src.name, "pairpack": n / t_pp, "orjson_1core": n / t_parse}
            if not args.no_datasets:
                row["datasets"] = n / time_it(lambda: hf_datasets(src, work / "hf"), "datasets")
            row["cpu"] = {k: n / CPU[k] for k in row if k in CPU}
            rows.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(work / "pp", ignore_errors=True)
        if GPT2.exists() and args.text_pairs:
            from tokenizers import Tokenizer

            tj = work / "text.jsonl"
            if not tj.exists():
                gen_text(tj, args.text_pairs)
            tok = Tokenizer.from_file(str(GPT2))
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            c0 = _cpu()
            t_enc = encode_batch_all_cores(tj, tok)  # CPU includes the JSON read; wall does not
            CPU["encode_batch_all_cores"] = _cpu() - c0
            rep = None

            def run() -> None:
                nonlocal rep
                rep = build([tj], work / "pt", force=True, tokenizer=GPT2, workers=workers)

            t_pt = time_it(run, "pairpack")
            t_pt1 = time_it(lambda: build([tj], work / "pt1", force=True, tokenizer=GPT2, workers=1),
                            "pairpack_workers1")
            tokens = rep.tokens + rep.prompt_tokens_saved
            row = {"input": f"{tj.name} (GPT-2, {tokens / args.text_pairs:,.0f} tokens/pair)",
                   "pairpack": args.text_pairs / t_pt, "pairpack_workers1": args.text_pairs / t_pt1,
                   "encode_batch_all_cores": args.text_pairs / t_enc}
            row["cpu"] = {k: args.text_pairs / CPU[k] for k in row if k in CPU}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{cores} cores (load average {load:.1f} at the end), pairpack --workers {workers}; pairs/s of wall "
          "time, and pairs per CPU-second (ratio = pairpack / baseline)\n")
    print("| input | pairpack build | baseline | baseline pairs/s | ratio | pairpack / CPU-s | baseline / CPU-s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        cpu = r.get("cpu", {})
        for k, v in r.items():
            if k in ("input", "pairpack", "cpu"):
                continue
            label = {"orjson_1core": "orjson parse, 1 core", "datasets": "datasets from_json+save_to_disk",
                     "encode_batch_all_cores": "tokenizer encode_batch, all cores",
                     "pairpack_workers1": "pairpack --workers 1 (Rust threads)"}[k]
            print(f"| {r['input']} | {r['pairpack']:,.0f} | {label} | {v:,.0f} | {r['pairpack'] / v:.2f} | "
                  f"{cpu.get('pairpack', float('nan')):,.0f} | {cpu.get(k, float('nan')):,.0f} |")


if __name__ == "__main__":
    main()
