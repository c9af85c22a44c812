#!/usr/bin/env python3
"""DPO training-step time per batch layout on CPU: grouped padded vs packed vs prefix shared.

    python tools/bench_train_step.py                   # HH-like and UltraFeedback-like sets, TinyLM d256 x 4
    python tools/bench_train_step.py --quick           # tiny sizes: checks that the script works
    python tools/bench_train_step.py --json

For each generated set (written with :class:`pairpack.Writer` under a temporary directory):

* ``hh``: HH-like, long multi-turn prompts and short answers (P ~ 124, C, R ~ 47 tokens: the
  issue's HH figures 2(P+max(C,R)) = 378, 2P+C+R = 342, P+C+R = 218 per pair);
* ``uf``: UltraFeedback-like, short prompts and long answers (P ~ 186, C, R ~ 274: 1,069 / 920 / 734).

The pairs are sorted by length and cut into batches of ``--batch-size`` (grouped padding, the
strongest padded baseline), of which ``--batches`` are timed, the middle batch of each of as many
equal strata of the sorted order (:func:`spread`); the same batches are made in every layout with
``ds.batch(idx, layout=...)``, one pair per row for the packed layouts (``max_row_tokens=0``: with
a dense mask attention costs the square of the row length, so longer rows only add work on a CPU;
split attention costs the same per pair either way). One training
step = ``DPO(policy, ref_model=False)(batch, ref_*_logp=cached)`` forward, backward and an AdamW step
(the reference log-probs are computed once beforehand, as ``precompute_reference`` caches them).
Layouts are timed round-robin over ``--rounds`` rounds (the first is a warm-up) and the median
ms/step is reported with its ratio to grouped padded, measured in the same run.

TinyLM runs with torch's SDPA: causal (``is_causal``) for padded rows; for the others, with
``--attention auto`` (default) or ``split``, the layout's ``split_attention()`` (each pair's
``[prompt][chosen]`` causal, its rejected tokens over ``[prompt][rejected]``: two small SDPA calls
a layer), with ``dense`` a dense bool mask ``(R, 1, T, T)``. ``torch.set_num_threads(--threads)``
(default 1: on a shared machine more threads oversubscribe). Nothing is asserted; the figures are whatever this machine
gives (note its load: the script prints ``os.getloadavg()``).

:func:`train_step_table` is the reusable part (tools/bench_layouts.py calls it on its own sets).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pairpack  # noqa: E402
from pairpack.train.dpo import DPO, batch_logprobs  # noqa: E402
from pairpack.train.tinylm import TinyLM  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")
VOCAB = 259  # the byte tokenizer's
# (prompt mean, completion mean) in tokens; lengths are lognormal around them (sigma 0.35)
SHAPES = {"hh": (124, 47), "uf": (186, 274)}


def generate(path: Path, kind: str, n: int, seed: int = 0) -> pairpack.Dataset:
    """Write ``n`` random pairs of the ``kind`` shape (``SHAPES``) at ``path`` and open them. Chosen
    and rejected share a random prefix (as real answers often do); lengths >= 1."""
    rng = np.random.default_rng(seed)
    p_mean, c_mean = SHAPES[kind]

    def draw(mean: float, size: int) -> np.ndarray:
        return np.maximum(1, rng.lognormal(np.log(mean), 0.35, size).astype(np.int64))

    plen, clen, rlen = draw(p_mean, n), draw(c_mean, n), draw(c_mean, n)
    with pairpack.Writer(path, vocab_size=VOCAB, pad_id=0, force=True) as w:
        for p, c, r in zip(plen.tolist(), clen.tolist(), rlen.tolist()):
            common = int(rng.integers(0, min(c, r)))
            head = rng.integers(1, VOCAB, common)
            chosen = np.concatenate([head, rng.integers(1, VOCAB, c - common)])
            rejected = np.concatenate([head, rng.integers(1, VOCAB, r - common)])
            if np.array_equal(chosen, rejected):
                rejected[-1] = rejected[-1] % (VOCAB - 1) + 1
            w.add(rng.integers(1, VOCAB, p), chosen, rejected)
    return pairpack.open(path)


def grouped(ds: pairpack.Dataset, batch_size: int) -> list[np.ndarray]:
    """Index batches of pairs sorted by padded row length ``P + max(C, R)`` (grouped padding)."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in ds.lengths)
    order = np.argsort(p + np.maximum(c, r), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def spread(batches: list[np.ndarray], k: int) -> list[np.ndarray]:
    """``k`` of the length-sorted ``batches``: the middle one of each of ``k`` equal strata, so the
    timed batches represent the whole set (the first ``k`` would be its shortest pairs, the two
    ends its extremes)."""
    if k >= len(batches):
        return batches
    return [batches[int(i)] for i in (np.arange(k) + 0.5) * len(batches) / k]


def make_batch(ds: pairpack.Dataset, idx: np.ndarray, layout: str, *, max_row_tokens: int = 0,
               pad_to_multiple_of: int | None = None) -> Any:
    """The batch of pairs ``idx`` in ``layout`` (packed layouts: rows of at most ``max_row_tokens``
    tokens; 0: one pair per row)."""
    if layout == "padded":
        return ds.batch(idx, pad_to_multiple_of=pad_to_multiple_of)
    return ds.batch(idx, layout=layout, max_row_tokens=max_row_tokens, pad_to_multiple_of=pad_to_multiple_of)


def train_step_table(datasets: dict[str, pairpack.Dataset], *, d_model: int = 256, n_layers: int = 4,
                     batch_size: int = 16, batches: int = 8, rounds: int = 4, seed: int = 0,
                     layouts: tuple[str, ...] = LAYOUTS, attention: str = "auto") -> list[dict[str, Any]]:
    """Median DPO training-step time per layout on each dataset, with ratios to padded.

    Returns one dict per (set, layout): ``set``, ``layout``, ``ms_per_step``, ``speedup`` (padded
    ms / this ms, same run), ``tokens_per_pair`` (token slots the model processes per pair),
    ``max_logp_diff`` (largest |log-prob - padded log-prob| of the first batch at initialisation,
    nats: the layouts compute the same thing).
    """
    rows: list[dict[str, Any]] = []
    for name, ds in datasets.items():
        idx = spread(grouped(ds, batch_size), batches)
        if not idx:
            raise ValueError(f"set {name}: fewer than {batch_size} pairs")
        p, c, r = (np.asarray(x, dtype=np.int64) for x in ds.lengths)
        max_len = int((p + c + r).max())
        torch.manual_seed(seed)
        init = TinyLM(ds.vocab_size, max_len=max_len, d_model=d_model, n_layers=n_layers,
                      n_heads=max(1, d_model // 64))
        init.eval()
        state = {}
        for layout in layouts:
            bs = [make_batch(ds, i, layout) for i in idx]
            with torch.no_grad():  # the cached reference: the initial model's log-probs
                refs = [batch_logprobs(init, b, reduction="sum", attention=attention) for b in bs]
            policy = copy.deepcopy(init)
            dpo = DPO(policy, ref_model=False, reduction="sum", attention=attention)
            state[layout] = dict(batches=bs, refs=refs, dpo=dpo,
                                 opt=torch.optim.AdamW(dpo.parameters(), lr=1e-4), times=[],
                                 tokens=sum(b.padded_tokens() for b in bs) / sum(len(b) for b in bs))
        base = state[layouts[0]]["refs"][0]
        for layout in layouts:
            got = state[layout]["refs"][0]
            state[layout]["diff"] = max(float((g - w).abs().max()) for g, w in zip(got, base))
        for rnd in range(rounds + 1):
            for layout in layouts:
                s = state[layout]
                t0 = time.perf_counter()
                for b, (rc, rr) in zip(s["batches"], s["refs"]):
                    loss = s["dpo"](b, ref_chosen_logp=rc, ref_rejected_logp=rr)
                    s["opt"].zero_grad(set_to_none=True)
                    loss.backward()
                    s["opt"].step()
                if rnd:  # round 0 warms up
                    s["times"].append((time.perf_counter() - t0) / len(s["batches"]))
        ref_ms = statistics.median(state[layouts[0]]["times"]) * 1e3
        for layout in layouts:
            ms = statistics.median(state[layout]["times"]) * 1e3
            rows.append({"set": name, "layout": layout, "ms_per_step": ms, "speedup": ref_ms / ms,
                         "tokens_per_pair": state[layout]["tokens"], "max_logp_diff": state[layout]["diff"]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["set", "layout", "tokens/pair", "ms/step", "vs padded", "max |dlogp|"]
    body = [[r["set"], r["layout"], f"{r['tokens_per_pair']:.0f}", f"{r['ms_per_step']:.1f}",
             f"{r['speedup']:.2f}x", f"{r['max_logp_diff']:.1e}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=256, help="pairs per generated set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6, help="batches timed per layout and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="hh,uf")
    ap.add_argument("--attention", default="auto", choices=["auto", "split", "dense"],
                    help="how packed layouts reach TinyLM (auto: split)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.pairs, a.batch_size, a.batches, a.rounds, a.d_model, a.layers = 24, 4, 2, 1, 32, 1
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {k: generate(Path(tmp) / k, k, a.pairs, seed=i) for i, k in enumerate(a.sets.split(","))}
        rows = train_step_table(sets, d_model=a.d_model, n_layers=a.layers, batch_size=a.batch_size,
                                batches=a.batches, rounds=a.rounds, attention=a.attention)
    load = os.getloadavg()
    if a.json:
        print(json.dumps({"rows": rows, "loadavg": load, "threads": a.threads, "args": vars(a)}, indent=1))
    else:
        print(f"TinyLM d_model {a.d_model}, {a.layers} layers, batch {a.batch_size} pairs (grouped by length), "
              f"{a.batches} batches x {a.rounds} rounds, {a.threads} thread(s), attention {a.attention}, "
              f"torch {torch.__version__}")
        print(format_table(rows))
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
