#!/usr/bin/env python3
"""One prepared GPU check of the batch layouts with FlexAttention: DPO training steps/s, padded vs
packed vs prefix shared; no network, < 3 minutes on an H200.

    python tools/gpu_layouts.py               # on a GPU machine (prints one table)
    python tools/gpu_layouts.py --cpu-smoke   # tiny sizes on the CPU (dense masks): checks this script

For the generated HH-like and UltraFeedback-like sets of tools/bench_train_step.py (long prompts and
short answers; short prompts and long answers), a TinyLM (default d_model 1024, 8 layers, bf16
autocast) takes DPO training steps (forward + backward of the policy, AdamW; reference log-probs
cached beforehand) on length-grouped batches of the same pairs in each layout:

* ``padded``: SDPA with ``is_causal`` (the flash kernel), rows ``P + max(C, R)``;
* ``packed`` and ``prefix_shared``: rows of up to ``--row-tokens`` tokens, FlexAttention with the
  batch's block mask (``PackedBatch.block_mask()``), compiled once; ``T`` is padded to a multiple
  of 128 so that few shapes are compiled.

First an exactness check: the first batch's per-pair log-probs in every layout against padded
(float32, no autocast; reported, and the exit status is 1 if one differs by more than 1e-4 relative).
Then each layout is warmed up (compilation) and timed over whole passes of its batches until
``--seconds`` per layout are spent. Steps/s (batches of the same pairs), tokens/s and the ratio
to padded are printed. A global deadline (``--deadline``, default 170 s) stops the timing early and
says so. Without CUDA or without FlexAttention the script prints why and exits 0 (skip), unless
``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train_step import generate, grouped, make_batch  # noqa: E402
from pairpack.train.dpo import DPO, batch_logprobs  # noqa: E402
from pairpack.train.tinylm import TinyLM  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")


def skip_reason(cpu_smoke: bool) -> str | None:
    """Why this machine cannot run the GPU check (None: it can)."""
    if cpu_smoke:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False); nothing to measure here"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs >= 2.5)"
    return None


def plan(a: argparse.Namespace) -> dict[str, Any]:
    """Sizes and settings: full on CUDA, tiny with --cpu-smoke."""
    if a.cpu_smoke:
        return dict(device=torch.device("cpu"), attention="dense", d_model=32, layers=1, pairs=24, batch=4,
                    batches=2, seconds=0.2, row_tokens=0, mult=None, autocast=False)
    return dict(device=torch.device("cuda"), attention="flex", d_model=a.d_model, layers=a.layers, pairs=a.pairs,
                batch=a.batch_size, batches=a.batches, seconds=a.seconds, row_tokens=a.row_tokens, mult=128,
                autocast=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(a: argparse.Namespace) -> int:
    cfg = plan(a)
    dev = cfg["device"]
    t_start = time.perf_counter()
    deadline = t_start + a.deadline
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"TinyLM d_model {cfg['d_model']} x {cfg['layers']}, batch {cfg['batch']} pairs, attention "
          f"{cfg['attention']!r} for packed layouts, rows <= {cfg['row_tokens'] or 'one pair'} tokens")
    status = 0
    results = []
    truncated = False
    with tempfile.TemporaryDirectory() as tmp:
        for si, name in enumerate(a.sets.split(",")):
            ds = generate(Path(tmp) / name, name, cfg["pairs"], seed=si)
            idx = grouped(ds, cfg["batch"])[: cfg["batches"]]
            p, c, r = (x for x in ds.lengths)
            torch.manual_seed(0)
            init = TinyLM(ds.vocab_size, max_len=int((p + c + r).max()) + 1, d_model=cfg["d_model"],
                          n_layers=cfg["layers"], n_heads=max(1, cfg["d_model"] // 64)).to(dev).eval()
            runs: dict[str, dict[str, Any]] = {}
            for layout in LAYOUTS:
                bs = [make_batch(ds, i, layout, max_row_tokens=cfg["row_tokens"], pad_to_multiple_of=cfg["mult"])
                      .to(dev) for i in idx]
                att = "auto" if layout == "padded" else cfg["attention"]
                with torch.no_grad():
                    refs = [batch_logprobs(init, b, reduction="sum", attention=att) for b in bs]
                runs[layout] = dict(batches=bs, refs=refs, attention=att,
                                    tokens=sum(b.padded_tokens() for b in bs),
                                    real=sum(b.real_tokens() for b in bs))
            for layout in LAYOUTS[1:]:  # exactness: float32 log-probs of the first batch
                diff = max(float(((g - w).abs() / w.abs().clamp(min=1.0)).max())
                           for g, w in zip(runs[layout]["refs"][0], runs["padded"]["refs"][0]))
                ok = diff <= 1e-4
                status |= 0 if ok else 1
                print(f"[{name}] {layout}: max relative |logp - padded logp| on batch 0 = {diff:.1e} "
                      f"({'ok' if ok else 'FAIL > 1e-4'})")
            for layout in LAYOUTS:
                if time.perf_counter() > deadline:
                    truncated = True
                    break
                s = runs[layout]
                policy = copy.deepcopy(init).train()
                dpo = DPO(policy, ref_model=False, reduction="sum", attention=s["attention"])
                opt = torch.optim.AdamW(dpo.parameters(), lr=1e-5)

                def one_pass() -> None:
                    for b, (rc, rr) in zip(s["batches"], s["refs"]):
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg["autocast"]):
                            loss = dpo(b, ref_chosen_logp=rc, ref_rejected_logp=rr)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()

                t0 = time.perf_counter()
                one_pass()  # warm-up: compiles FlexAttention for these shapes
                sync(dev)
                warm = time.perf_counter() - t0
                passes, t0 = 0, time.perf_counter()
                while True:
                    one_pass()
                    passes += 1
                    sync(dev)
                    el = time.perf_counter() - t0
                    if el >= cfg["seconds"] or time.perf_counter() > deadline:
                        truncated |= el < cfg["seconds"]
                        break
                steps = passes * len(s["batches"])
                results.append(dict(set=name, layout=layout, steps_s=steps / el, tok_s=passes * s["tokens"] / el,
                                    real_per_pair=s["real"] / sum(len(b) for b in s["batches"]),
                                    slots_per_pair=s["tokens"] / sum(len(b) for b in s["batches"]),
                                    warmup_s=warm, steps=steps))
    print()
    header = ["set", "layout", "slots/pair", "real/pair", "steps/s", "vs padded", "warm-up s", "steps"]
    lines = []
    base = {r["set"]: r["steps_s"] for r in results if r["layout"] == "padded"}
    for r in results:
        ratio = r["steps_s"] / base[r["set"]] if r["set"] in base else float("nan")
        lines.append([r["set"], r["layout"], f"{r['slots_per_pair']:.0f}", f"{r['real_per_pair']:.0f}",
                      f"{r['steps_s']:.2f}", f"{ratio:.2f}x", f"{r['warmup_s']:.1f}", str(r["steps"])])
    widths = [max(len(x) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    for row in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
    if truncated:
        print(f"note: the deadline ({a.deadline:.0f} s) or --seconds cut some timings short")
    print(f"total {time.perf_counter() - t_start:.0f} s; target: prefix_shared >= 1.3x padded steps/s on hh")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU with dense masks")
    ap.add_argument("--sets", default="hh,uf")
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--row-tokens", type=int, default=4096, help="packed layouts: longest row (0: one pair per row)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timing per layout and set, after warm-up")
    ap.add_argument("--deadline", type=float, default=170.0, help="stop timing after this many seconds in all")
    a = ap.parse_args(argv)
    why = skip_reason(a.cpu_smoke)
    if why is not None:
        print(f"SKIP gpu_layouts: {why}")
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
