"""``pairpack split``: named train/eval splits in which no prompt is in two splits.

Pairs are grouped by their prompt's token ids (:func:`pairpack.read.prompts.prompt_keys`), so every
pair of a prompt, every pair made from one multi-completion record, and prompts written twice in
the source land in the same split. The groups are shuffled with the seed and taken into the eval
split while that brings its pair count closest to ``eval_fraction * N`` (to within one prompt
group). ``by="pair"`` is a plain random split of pairs. The splits are recorded in the dataset as
checksummed index files (FORMAT.md §4.5, §5.6) by :func:`pairpack.write.splits.write_splits`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .. import format as fmt
from ..errors import ArgumentError
from ..read.dataset import Dataset, open_dataset
from ..read.prompts import prompt_keys
from ..write.splits import SplitSpec, write_splits

__all__ = ["SplitReport", "split", "prompt_groups"]


@dataclass
class SplitReport:
    """What :func:`split` recorded: per split name, ``(pairs, distinct prompts)``; the time taken."""

    path: str
    by: str
    seed: int
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The report as the lines ``pairpack split`` prints."""
        total = sum(n for n, _ in self.splits.values()) or 1
        lines = [f"split {self.path} by {self.by} (seed {self.seed}) in {self.seconds:.2f} s"]
        lines += [f"  {name:<8} {n:>12,} pairs ({n / total:.2%}), {u:,} prompts"
                  for name, (n, u) in self.splits.items()]
        return "\n".join(lines)


def prompt_groups(ds: Dataset) -> tuple[np.ndarray, int]:
    """Dense prompt group of every pair: (int64 ``(N,)`` group ids, number of groups); pairs whose
    prompts hold the same token ids share a group."""
    keys = prompt_keys(ds._live())
    _, inv = np.unique(keys, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    return inv, int(inv.max()) + 1 if inv.size else 0


def assign(groups: np.ndarray, num_groups: int, *, eval_fraction: float, seed: int, by: str) -> np.ndarray:
    """bool ``(N,)``: the pairs of the eval split (see the module docstring). ``groups`` from
    :func:`prompt_groups` (used only with ``by="prompt"``)."""
    n = len(groups)
    target = int(round(eval_fraction * n))
    rng = np.random.default_rng([int(seed), 26])
    out = np.zeros(n, dtype=bool)
    if by == "pair":
        out[rng.permutation(n)[:target]] = True
        return out
    sizes = np.bincount(groups, minlength=num_groups)
    order = rng.permutation(num_groups)
    reach = np.concatenate([[0], np.cumsum(sizes[order])])
    k = int(np.argmin(np.abs(reach - target)))  # the prefix of groups closest to the target
    chosen = np.zeros(num_groups, dtype=bool)
    chosen[order[:k]] = True
    return chosen[groups]


def split(dataset: str | os.PathLike | Dataset, *, eval_fraction: float, seed: int = 0, by: str = "prompt",
          names: tuple[str, str] = ("train", "eval")) -> SplitReport:
    """Record a train/eval split in ``dataset`` (replacing its splits), atomically.

    Args:
        dataset: a dataset directory (or an open Dataset: its path is written).
        eval_fraction: fraction of pairs in the eval split, in ``[0, 1]``; met to within one
            prompt group (``by="prompt"``) or exactly to rounding (``by="pair"``).
        seed: the only input of the draw besides the dataset (``>= 0``).
        by: ``"prompt"`` (no prompt, by token ids, in both splits) or ``"pair"`` (random pairs).
        names: the two split names (FORMAT.md §5.6 pattern).

    Returns:
        A :class:`SplitReport`; ``pairpack.open(dataset).split(names[1])`` gives the indices.
    """
    t0 = time.perf_counter()
    if not 0.0 <= float(eval_fraction) <= 1.0:
        raise ArgumentError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if by not in fmt.SPLIT_BY:
        raise ArgumentError(f"by must be one of {list(fmt.SPLIT_BY)}, got {by!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ArgumentError(f"seed must be an int >= 0, got {seed!r}")
    if len(names) != 2 or names[0] == names[1]:
        raise ArgumentError(f"names must be two distinct split names, got {names!r}")
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    groups, num_groups = prompt_groups(ds)
    in_eval = assign(groups, num_groups, eval_fraction=float(eval_fraction), seed=int(seed), by=by)
    specs = []
    report = SplitReport(str(ds.path), by, int(seed))
    for name, mask in ((names[0], ~in_eval), (names[1], in_eval)):
        idx = np.flatnonzero(mask).astype(np.int64)
        prompts = int(np.unique(groups[idx]).size)
        specs.append(SplitSpec(name, idx, by, int(seed), prompts))
        report.splits[name] = (int(idx.size), prompts)
    write_splits(ds.path, specs, fingerprint=ds.fingerprint)
    report.seconds = time.perf_counter() - t0
    return report
