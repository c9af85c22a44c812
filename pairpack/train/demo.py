"""The end-to-end DPO demo behind ``pairpack demo``: pure DPO on real pairs, on CPU, in about a minute.

Steps (all on a dataset that ``pairpack build`` made from the bundled sample):

1. A small causal transformer (:class:`~pairpack.train.tinylm.TinyLM`) is initialised; it is both the
   policy and, frozen, the reference.
2. The reference log-probs of every pair are computed once and stored in the dataset as
   columns (:func:`pairpack.reference.precompute_reference`); training then runs
   ``DPO(model, ref_model=False)`` fed from those columns: no second model in memory.
3. The last pairs of the dataset (a block of whole evaluation batches) are held out; the policy
   trains with AdamW on random, length-grouped batches of the others. At a few checkpoints the
   loss, reward accuracy and reward margin are measured on a fixed block of training pairs and
   on the held-out pairs, in the same batches as the cache was computed, so that at step 0 the
   policy's log-probs equal the cached ones bit for bit: the loss is exactly ln 2, the margin 0
   and the accuracy (strict ``>``) 0.

Every batch (cache, training, evaluation) is made in ``DemoConfig.layout``: ``"padded"`` rows, or
``"prefix_shared"``/``"packed"`` rows of one pair each, which TinyLM takes with positions and its
default attention for them, split (``batch.split_attention()``; docs/layouts.md).

No SFT step comes first: this is DPO alone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..batch.loader import Loader
from ..errors import StateError, import_optional
from ..progress import CountProgress
from ..read.dataset import Dataset, open_dataset
from ..tables import text_table
from .dpo import DPO
from .reference import (
    REFERENCE_COLUMNS,
    check_reference,
    model_hash,
    precompute_reference,
    reference_kwargs,
)
from .tinylm import TinyLM

__all__ = ["DemoConfig", "DemoResult", "run_demo", "format_table", "save_plot"]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run. Defaults: the ``pairpack demo`` run (about a minute on 2 cores).

    Attributes:
        steps: optimizer steps. eval_every: steps between checkpoints (step 0 and the last
            step are always evaluated).
        batch_size: pairs per training step. lr: AdamW learning rate. beta: DPO beta.
        reduction: ``"sum"`` (per-sequence, the DPO paper's) or ``"mean"`` (per token).
        d_model, n_layers, n_heads: size of the TinyLM.
        held_out: at least this many pairs at the end of the dataset are held out (rounded up
            to whole evaluation batches).
        train_eval: pairs from the start of the training split evaluated at checkpoints
            (rounded down to whole evaluation batches; they are also trained on).
        eval_batch: pairs per evaluation batch and per reference-cache batch (small: index-order
            batches pad to their longest pair).
        group_window: training batches are drawn from shuffled windows of this many batches,
            sorted by length inside a window (less padding, random order).
        seed: seeds the model initialisation and the batch order.
        threads: torch CPU threads during the run (None: torch's setting). 1 by default: on a
            shared 2-core machine two threads ran 4x slower than one (oversubscription), and
            with one thread the run is reproducible bit for bit.
        layout: batch layout of the whole run, ``"padded"``, ``"packed"`` or ``"prefix_shared"``
            (one pair per row: dense masks on the CPU cost the square of the row length).
    """

    steps: int = 120
    eval_every: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.1
    reduction: str = "sum"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    held_out: int = 100
    train_eval: int = 100
    eval_batch: int = 10
    group_window: int = 8
    seed: int = 0
    threads: int | None = 1
    layout: str = "padded"

    def batch_kwargs(self) -> dict[str, Any]:
        """The layout keywords of ``ds.batch``/``Loader``/``precompute_reference`` for this run."""
        return {"layout": self.layout} if self.layout == "padded" else {"layout": self.layout, "max_row_tokens": 0}


@dataclass
class DemoResult:
    """What a demo run measured.

    Attributes:
        rows: one dict per checkpoint: ``step``, ``train_loss``, ``train_acc``,
            ``train_margin``, ``heldout_loss``, ``heldout_acc``, ``heldout_margin`` (means over
            pairs; loss in nats, margin = chosen reward - rejected reward), ``seconds`` (since
            training started).
        step_losses: the training loss of every step (its batch), for the curves.
        n_train, n_heldout, n_train_eval: pair counts of the splits.
        reference_seconds, train_seconds: wall time of the cache pass and of training
            (checkpoints included).
        params: number of model parameters.
    """

    config: DemoConfig
    rows: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    n_train: int = 0
    n_heldout: int = 0
    n_train_eval: int = 0
    reference_seconds: float = 0.0
    train_seconds: float = 0.0
    params: int = 0

    def to_json(self) -> dict[str, Any]:
        """The result and its configuration as a JSON-ready dict."""
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


def _evaluate(dpo: DPO, ds: Dataset, lo: int, hi: int, cfg: DemoConfig) -> tuple[float, float, float]:
    """Mean loss, reward accuracy and margin over pairs [lo, hi), in the cache's batches."""
    sums = np.zeros(3)
    eval_batch = cfg.eval_batch
    with torch.no_grad():
        for a in range(lo, hi, eval_batch):
            batch = ds.batch(np.arange(a, min(a + eval_batch, hi)), columns=REFERENCE_COLUMNS, **cfg.batch_kwargs())
            loss, m = dpo(batch, **reference_kwargs(batch), return_metrics=True)
            k = len(batch)
            sums += k * np.array([loss.item(), m["rewards/accuracies"].item(), m["rewards/margins"].item()])
    loss, acc, margin = (sums / max(hi - lo, 1)).tolist()
    return loss, acc, margin


def _batches(ds: Dataset, h0: int, cfg: DemoConfig) -> Iterator[Any]:
    """Endless training batches of pairs ``[0, h0)`` from :class:`pairpack.Loader`: length-grouped
    within shuffled windows, reshuffled each epoch, carrying the cached reference log-probs."""
    loader = Loader(ds, batch_size=cfg.batch_size, group_by_length=True, window=cfg.batch_size * cfg.group_window,
                    seed=cfg.seed, indices=np.arange(h0), columns=REFERENCE_COLUMNS, **cfg.batch_kwargs())
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_demo(
    dataset: str | os.PathLike | Dataset,
    config: DemoConfig = DemoConfig(),
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train a TinyLM with DPO on ``dataset`` (byte-tokenized pairs) and measure it.

    Adds the reference cache columns to ``dataset`` (replacing earlier ones). Returns the
    measurements; :func:`format_table` prints them, :func:`save_plot` draws them.

    Raises:
        StateError: the dataset is too small for the requested splits or its vocabulary
            is larger than 65,536 ids (the demo is meant for the byte tokenizer).
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(dataset, config, progress, log or (lambda s: None))
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found


def _run(dataset: str | os.PathLike | Dataset, cfg: DemoConfig, progress: bool | None,
         say: Callable[[str], None]) -> DemoResult:
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    n = len(ds)
    eb = cfg.eval_batch
    # held-out pairs: a tail of whole cache batches, so evaluation batches equal cache batches
    h0 = max(((n - cfg.held_out) // eb) * eb, 0)
    n_train_eval = min((cfg.train_eval // eb) * eb, h0)
    if h0 < cfg.batch_size or n - h0 < 1 or n_train_eval < 1:
        raise StateError(f"{ds.path}: {n} pairs are too few for the demo's splits "
                            f"(held_out={cfg.held_out}, train_eval={cfg.train_eval}, eval_batch={eb})")
    if ds.vocab_size > 65536:
        raise StateError(f"{ds.path}: vocab_size {ds.vocab_size} is too large for the demo model")
    lengths = ds.lengths[0] + np.maximum(ds.lengths[1], ds.lengths[2])
    max_len = int(lengths.max())

    torch.manual_seed(cfg.seed)
    model = TinyLM(ds.vocab_size, max_len=max_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                   n_heads=cfg.n_heads)
    result = DemoResult(cfg, n_train=h0, n_heldout=n - h0, n_train_eval=n_train_eval,
                        params=sum(p.numel() for p in model.parameters()))
    say(f"model: TinyLM {cfg.n_layers} layers, d_model {cfg.d_model}, {result.params:,} parameters; "
        f"{h0:,} training pairs, {n - h0:,} held out; {cfg.layout} batches")

    t0 = time.perf_counter()
    ds = precompute_reference(ds, model, batch_size=eb, reduction=cfg.reduction, progress=progress,
                              **cfg.batch_kwargs())
    check_reference(ds, reduction=cfg.reduction, model_hash=model_hash(model))
    result.reference_seconds = time.perf_counter() - t0
    say(f"reference log-probs of {n:,} pairs cached as dataset columns in {result.reference_seconds:.1f} s")

    dpo = DPO(model, beta=cfg.beta, reduction=cfg.reduction, ref_model=False)
    opt = torch.optim.AdamW(dpo.parameters(), lr=cfg.lr, weight_decay=0.0)
    batches = _batches(ds, h0, cfg)
    checkpoints = set(range(0, cfg.steps + 1, max(cfg.eval_every, 1))) | {cfg.steps}
    bar = CountProgress(cfg.steps, label="steps", enabled=progress)
    t0 = time.perf_counter()
    try:
        for step in range(cfg.steps + 1):
            if step == cfg.steps:
                bar.close()  # the bar times the training steps, not the last checkpoint
            if step in checkpoints:
                tr = _evaluate(dpo, ds, 0, n_train_eval, cfg)
                ho = _evaluate(dpo, ds, h0, n, cfg)
                result.rows.append({"step": step, "train_loss": tr[0], "train_acc": tr[1], "train_margin": tr[2],
                                    "heldout_loss": ho[0], "heldout_acc": ho[1], "heldout_margin": ho[2],
                                    "seconds": time.perf_counter() - t0})
            if step == cfg.steps:
                break
            batch = next(batches)
            loss = dpo(batch, **reference_kwargs(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.step_losses.append(loss.item())
            bar.postfix = f"loss {loss.item():.4f}"
            bar.update(step + 1)
    finally:
        bar.close()
    result.train_seconds = time.perf_counter() - t0
    return result


def format_table(result: DemoResult) -> str:
    """The checkpoint table as aligned text (loss in nats; acc = fraction chosen reward > rejected)."""
    header = ["step", "train loss", "train acc", "train margin", "held-out loss", "held-out acc",
              "held-out margin", "time (s)"]
    rows = [[str(r["step"]), f"{r['train_loss']:.4f}", f"{r['train_acc']:.3f}", f"{r['train_margin']:.3f}",
             f"{r['heldout_loss']:.4f}", f"{r['heldout_acc']:.3f}", f"{r['heldout_margin']:.3f}",
             f"{r['seconds']:.1f}"] for r in result.rows]
    return "\n".join(text_table([header, *rows], "r" * len(header), rule=True))


def save_plot(result: DemoResult, path: str | os.PathLike) -> Path:
    """Save loss / accuracy / margin curves to ``path`` (PNG). Needs matplotlib (extra "plot").

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install "pairpack[plot]"``).
    """
    import_optional("matplotlib", feature="--plot", extra="plot").use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in result.rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    if result.step_losses:
        ax.plot(range(1, len(result.step_losses) + 1), result.step_losses, color="0.75", lw=0.8,
                label="training batch")
    ax.plot(steps, [r["train_loss"] for r in result.rows], "o-", label=f"train ({result.n_train_eval} pairs)")
    ax.plot(steps, [r["heldout_loss"] for r in result.rows], "s-", label=f"held-out ({result.n_heldout} pairs)")
    ax.axhline(LN2, color="k", ls=":", lw=0.8, label="ln 2")
    for ax, key, title in ((axes[0], "loss", "DPO loss (nats)"), (axes[1], "acc", "reward accuracy"),
                           (axes[2], "margin", "reward margin")):
        if key != "loss":
            ax.plot(steps, [r[f"train_{key}"] for r in result.rows], "o-", label="train")
            ax.plot(steps, [r[f"heldout_{key}"] for r in result.rows], "s-", label="held-out")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = result.config
    fig.suptitle(f"pairpack demo: TinyLM ({result.params:,} params), DPO beta={cfg.beta}, "
                 f"reduction={cfg.reduction}, lr={cfg.lr}, batch {cfg.batch_size}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
