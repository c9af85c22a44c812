#!/usr/bin/env python3
"""TRL's own DPOTrainer against pairpack.trl.DPOTrainer on a Hugging Face Llama, on the CPU.

    python tools/bench_trl.py                 # epochs on HH-like and UF-like pairs, first step, resume
    python tools/bench_trl.py --quick         # tiny sizes: checks that the script works
    python tools/bench_trl.py --gpu           # the same on CUDA in bf16 (tools/gpu_session.sh); skipped without CUDA

Every figure is measured in this run; ratios are against TRL's trainer (or pairpack's grouped padded
layout) measured in the same run. Nothing is asserted.

* **Epoch**: the same text records (byte-level tokenizer: one token per byte; HH-like: prompts ~124
  and answers ~47 tokens; UF-like: ~186 / ~274) go to TRL's trainer as a ``datasets.Dataset`` and to
  pairpack's as the dataset ``pairpack build`` makes of them. A Llama of ``--hidden`` and ``--layers``
  (built from a config), batches of ``--batch-size`` pairs, one epoch, no gradient checkpointing,
  forward + backward + AdamW, best of ``--repeats``. pairpack runs ``padded`` (random order, the
  drop-in replacement), ``prefix_shared`` (random order), and with length grouping under a token
  budget (``--max-tokens``) ``padded`` and ``prefix_shared``. Seconds per epoch are the training loop
  (``on_train_begin`` to ``on_train_end``): trainer construction (TRL's ``datasets.map``) and
  ``train()``'s one-off set-up, alike for every trainer, are left out.
* **First step**: a fresh Python process per trainer, timed from its start to the end of its first
  optimizer step, on ``--pairs`` pairs (default 200,000): TRL gets the text records (it tokenizes and
  maps them: TRL has no pre-tokenized input), pairpack the built dataset (it opens it). Also timed
  from the end of the imports (torch, transformers, TRL: several seconds common to both; with peft
  installed transformers imports it too).
* **Resume at step N**: ``get_resumed_dataloader`` on a pairpack trainer at step ``--resume-step`` of
  an epoch (what ``train(resume_from_checkpoint=...)`` does before the first resumed batch), against
  TRL's default, accelerate's ``skip_first_batches`` iterating that many batches of its dataloader.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = {"hh": (124, 47), "uf": (186, 274)}  # (prompt, answer) mean tokens, as tools/bench_train_step.py


def text_records(kind: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` records of lowercase ASCII words with lognormal lengths (bytes = tokens); chosen and
    rejected share a random prefix, as real answers often do."""
    rng = np.random.default_rng(seed)
    p_mean, c_mean = SHAPES[kind]
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", dtype=np.uint8)

    def txt(k: int) -> str:
        return bytes(letters[rng.integers(0, len(letters), max(1, k))]).decode()

    def draw(mean: float) -> int:
        return max(2, int(rng.lognormal(np.log(mean), 0.35)))

    out = []
    for _ in range(n):
        c, r = draw(c_mean), draw(c_mean)
        common = txt(int(rng.integers(0, min(c, r) - 1)))
        chosen, rejected = " " + common + txt(c - len(common)), " " + common + txt(r - len(common))
        if chosen == rejected:
            rejected += "x"
        out.append({"prompt": "Human: " + txt(draw(p_mean)) + "\nAssistant:", "chosen": chosen, "rejected": rejected})
    return out


def _setup(tmp: Path, kind: str, n: int) -> dict[str, Any]:
    import pairpack
    from tests.trl_support import byte_tokenizer

    tok = byte_tokenizer(tmp / "tok")
    recs = text_records(kind, n)
    src = tmp / f"{kind}-{n}.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp / f"{kind}-{n}"
    pairpack.build([str(src)], out, tokenizer=str(tok / "tokenizer.json"), force=True, progress=False)
    return {"records": recs, "src": src, "ds": out, "tok": tok}


def _args(cls: Any, out: Path, **kw: Any) -> Any:
    return cls(output_dir=str(out), report_to=[], save_strategy="no", logging_strategy="no", use_cpu=kw.pop("cpu", True),
               gradient_checkpointing=False, learning_rate=1e-4, disable_tqdm=True, seed=0, num_train_epochs=1, **kw)


def epoch_table(kind: str, n: int, *, hidden: int, layers: int, batch_size: int, max_tokens: int, repeats: int,
                tmp: Path, device: str = "cpu", max_row_tokens: int | None = None) -> list[dict[str, Any]]:
    import datasets
    import transformers
    import trl

    from pairpack.trl import DPOConfig, DPOTrainer
    from tests.trl_support import tiny_llama

    d = _setup(tmp, kind, n)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(d["tok"]))
    base = tiny_llama(0, hidden=hidden, layers=layers)
    gpu = device != "cpu"
    if gpu:
        base = base.to(device=device, dtype=torch.bfloat16)
    common = dict(per_device_train_batch_size=batch_size, cpu=not gpu, bf16=gpu, max_length=2048)
    runs: dict[str, Any] = {
        "TRL DPOTrainer": lambda: trl.DPOTrainer(
            copy.deepcopy(base), ref_model=copy.deepcopy(base), train_dataset=datasets.Dataset.from_list(d["records"]),
            processing_class=tok, args=_args(trl.DPOConfig, tmp / "trl", **common)),
    }
    for name, kw in (("pairpack padded", {}), ("pairpack prefix shared", dict(layout="prefix_shared")),
                     ("pairpack grouped padded", dict(max_tokens=max_tokens, group_by_length=True)),
                     ("pairpack grouped prefix shared", dict(max_tokens=max_tokens, group_by_length=True,
                                                             layout="prefix_shared", max_row_tokens=max_row_tokens))):
        runs[name] = (lambda kw=kw: DPOTrainer(copy.deepcopy(base), ref_model=copy.deepcopy(base),
                                               train_dataset=d["ds"], args=_args(DPOConfig, tmp / "pp", **common, **kw)))
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """The epoch's loop: from on_train_begin to on_train_end (train()'s one-off set-up, e.g. its
        gc.collect(), is the same for every trainer and left out)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.seconds = time.perf_counter() - self.t0

    best: dict[str, float] = {}
    for _ in range(repeats):  # round-robin, so load changes hit every trainer alike
        for name, make in runs.items():
            trainer, clock = make(), Clock()
            trainer.add_callback(clock)
            trainer.train()
            best[name] = min(best.get(name, float("inf")), clock.seconds)
    rows = []
    for name, s in best.items():
        rows.append({"set": kind, "trainer": name, "s_per_epoch": round(s, 3),
                     "vs_trl": round(best["TRL DPOTrainer"] / s, 2),
                     "vs_grouped_padded": round(best["pairpack grouped padded"] / s, 2)})
    return rows


_FIRST_STEP = r"""
import sys, time, copy, json
t0 = float(sys.argv[1]); which, data, tok_dir = sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, sys.argv[5])
import transformers
from tests.trl_support import tiny_llama
from transformers import TrainerCallback
class Stop(TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kw):
        print(json.dumps({"seconds": time.time() - t0, "after_imports": time.time() - t1}))
        sys.stdout.flush(); raise SystemExit(0)
m = tiny_llama(0, hidden=32, layers=1)
kw = dict(output_dir="/tmp/pp-first", report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=False,
          per_device_train_batch_size=8, max_steps=1, disable_tqdm=True, dataset_num_proc=None)
if which == "trl":
    import datasets, trl
    t1 = time.time()
    recs = datasets.load_dataset("json", data_files=data, split="train")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tok_dir)
    t = trl.DPOTrainer(m, ref_model=copy.deepcopy(m), train_dataset=recs, processing_class=tok,
                       args=trl.DPOConfig(**kw), callbacks=[Stop()])
else:
    from pairpack.trl import DPOConfig, DPOTrainer
    t1 = time.time()
    t = DPOTrainer(m, ref_model=copy.deepcopy(m), train_dataset=data, args=DPOConfig(**kw), callbacks=[Stop()])
t.train()
"""


def first_step(n: int, tmp: Path) -> list[dict[str, Any]]:
    d = _setup(tmp, "hh", n)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-cache"), "TQDM_DISABLE": "1"}
    out = {}
    for which, data in (("trl", str(d["src"])), ("pairpack", str(d["ds"]))):
        p = subprocess.run([sys.executable, "-c", _FIRST_STEP, repr(time.time()), which, data, str(d["tok"]), str(ROOT)],
                           capture_output=True, text=True, env=env, timeout=3600)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise SystemExit(f"first-step run {which} failed:\n{p.stderr[-3000:]}")
        out[which] = json.loads(lines[-1])
    t, p = out["trl"], out["pairpack"]
    return [{"pairs": n, "trl_s": round(t["seconds"], 2), "pairpack_s": round(p["seconds"], 2),
             "ratio": round(t["seconds"] / p["seconds"], 1),
             "after_imports_trl_s": round(t["after_imports"], 2), "after_imports_pairpack_s": round(p["after_imports"], 2),
             "after_imports_ratio": round(t["after_imports"] / p["after_imports"], 1)}]


def resume(step: int, tmp: Path) -> list[dict[str, Any]]:
    import datasets
    import transformers
    import trl
    from accelerate import skip_first_batches

    from pairpack.trl import DPOConfig, DPOTrainer
    from tests.trl_support import tiny_llama

    n = step * 8 + 8 * 16
    d = _setup(tmp, "hh", n)
    m = tiny_llama(0, hidden=32, layers=1)
    pp = DPOTrainer(m, ref_model=copy.deepcopy(m), train_dataset=d["ds"],
                    args=_args(DPOConfig, tmp / "r", per_device_train_batch_size=8))
    dl = pp.get_train_dataloader()
    t0 = time.perf_counter()
    dl = pp.get_resumed_dataloader(dl, step)
    first = next(iter(dl))
    t_pp = time.perf_counter() - t0
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(d["tok"]))
    tr = trl.DPOTrainer(m, ref_model=copy.deepcopy(m), train_dataset=datasets.Dataset.from_list(d["records"]),
                        processing_class=tok, args=_args(trl.DPOConfig, tmp / "r2", per_device_train_batch_size=8))
    tdl = tr.get_train_dataloader()
    t0 = time.perf_counter()
    next(iter(skip_first_batches(tdl, step)))
    t_trl = time.perf_counter() - t0
    return [{"resume_step": step, "pairpack_s": round(t_pp, 4), "trl_skip_s": round(t_trl, 2),
             "pairpack_first_batch_pairs": len(first["pairpack_batch"])}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs-epoch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-row-tokens", type=int, default=None,
                    help="grouped prefix shared: the longest row (default: the budget; 0: one pair per row)")
    ap.add_argument("--sets", default="hh,uf", help="epoch sets, comma-separated (hh, uf)")
    ap.add_argument("--pairs", type=int, default=200_000, help="pairs for the first-step comparison")
    ap.add_argument("--resume-step", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["epoch", "first", "resume"], action="append")
    ap.add_argument("--gpu", action="store_true", help="epochs on CUDA in bf16 (skipped without CUDA)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.pairs_epoch, a.hidden, a.repeats, a.pairs, a.resume_step = 16, 32, 1, 2000, 50
    torch.set_num_threads(a.threads)
    device = "cpu"
    if a.gpu:
        if not torch.cuda.is_available():
            print("bench_trl --gpu: no CUDA device; skipped")
            return 0
        device = "cuda"
    parts = a.only or ["epoch", "first", "resume"]
    report: dict[str, Any] = {"load": os.getloadavg(), "threads": a.threads, "device": device}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "epoch" in parts:
            report["epoch"] = [r for kind in a.sets.split(",") for r in epoch_table(
                kind, a.pairs_epoch, hidden=a.hidden, layers=a.layers, batch_size=a.batch_size,
                max_tokens=a.max_tokens, repeats=a.repeats, tmp=tmp, device=device,
                max_row_tokens=a.max_row_tokens)]
        if "first" in parts and device == "cpu":
            report["first_step"] = first_step(a.pairs, tmp)
        if "resume" in parts and device == "cpu":
            report["resume"] = resume(a.resume_step, tmp)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        for key, rows in report.items():
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                print(f"\n{key}")
                cols = list(rows[0])
                print(" | ".join(cols))
                for r in rows:
                    print(" | ".join(str(r[c]) for c in cols))
            else:
                print(f"{key}: {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
