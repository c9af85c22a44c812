"""``pairpack stats``: the numbers that pick ``max_length`` and a batch size, before training.

Everything here is numpy over the stored index arrays (``lengths``, ``starts``); only the
"become identical after truncation" count reads tokens, and it does so once, vectorised: it
measures for every pair the longest common prefix ``K`` of chosen and rejected, after which the
count for any ``max_length`` is arithmetic (completions are cut from their end, so the truncated
completions are identical exactly when they have the same length ``C' = R'`` and ``C' <= K``).
No torch import: truncation is the loader's own rule (:class:`pairpack.batch.options.Truncation`)
and the padding numbers come from a :class:`~pairpack.Loader`'s own epoch plan (its order and its
planner's batches, nothing assembled), which are numpy too.

Lengths are in tokens. Percentiles are observed values (``inverted_cdf``): ``p99 = x`` means at
least 99% of pairs have a length ``<= x``, so ``max_length = p99`` of the pair length keeps at
least 99% of pairs whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..batch.options import Truncation
from ..batch.options import LAYOUTS as LAYOUT_NAMES
from ..batch.plan import padding_ceiling, padding_efficiency, tokens_processed
from ..errors import import_optional
from ..tables import text_table

__all__ = ["DatasetStats", "compute_stats", "plot_stats", "percentiles"]

PERCENTILES = (50, 90, 99)
SPARK = " ▁▂▃▄▅▆▇█"  # index 0 = empty bin, 1..8 = height eighths
HIST_BINS = 16
DEFAULT_BATCH_SIZE = 32
_GATHER_BUDGET = 1 << 22  # tokens gathered per comparison round (bounds memory: 2 x 8 bytes each)


# --- token-level: longest common prefix of chosen and rejected -------------------------------------
def common_prefix_lengths(tokens: np.ndarray, a_starts: np.ndarray, b_starts: np.ndarray,
                          limit: np.ndarray) -> np.ndarray:
    """Longest common prefix ``K`` (int64 ``(N,)``) of ``tokens[a_i:a_i+limit_i]`` and
    ``tokens[b_i:b_i+limit_i]`` for each ``i``; ``0 <= K_i <= limit_i``.

    Vectorised in rounds over a growing window (16, 64, 256, ... positions), only for pairs still
    equal so far, so the work is about twice the common prefixes plus 16 tokens per pair, and at
    most ``_GATHER_BUDGET`` tokens are gathered at once.
    """
    a = np.asarray(a_starts, dtype=np.int64)
    b = np.asarray(b_starts, dtype=np.int64)
    m = np.asarray(limit, dtype=np.int64)
    k = np.zeros(len(m), dtype=np.int64)
    active = np.nonzero(m > 0)[0]
    lo, width = 0, 16
    while active.size:
        w = max(1, min(width, _GATHER_BUDGET // active.size))
        for part in np.array_split(active, max(1, -(-active.size * w // _GATHER_BUDGET))):
            seg = np.minimum(m[part] - lo, w)  # >= 1: active pairs have m > lo
            off = np.cumsum(seg) - seg
            owner = np.repeat(np.arange(part.size), seg)
            pos = np.arange(int(seg.sum()), dtype=np.int64) - off[owner] + lo
            neq = tokens[a[part][owner] + pos] != tokens[b[part][owner] + pos]
            # first mismatching position per pair, or the end of its window when none
            first = np.minimum.reduceat(np.where(neq, pos, lo + seg[owner]), off)
            k[part] = first
        still = (k[active] == lo + w) & (m[active] > lo + w)
        active = active[still]
        lo += w
        width *= 4
    return k


def dataset_common_prefix(ds: Any, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """For every pair of ``ds``: (common prefix length ``K`` of chosen and rejected, int64 ``(N,)``;
    prompt key, int64 ``(N,)``, equal for pairs that share one stored prompt).

    Reads the index arrays shard by shard through ``ds.segments`` (bounds-checked) and tokens only
    for the common prefixes.
    """
    n = len(ds)
    lcp = np.zeros(n, dtype=np.int64)
    key = np.zeros(n, dtype=np.int64)
    base = 0
    key_base = 0
    for s in ds.manifest.shards:
        for a in range(base, base + s.num_pairs, chunk):
            idx = np.arange(a, min(a + chunk, base + s.num_pairs), dtype=np.int64)
            tokens, st, ln = ds.segments(idx)
            lcp[idx] = common_prefix_lengths(tokens[0], st[1], st[2], np.minimum(ln[1], ln[2]))
            # prompt starts are shard-local; tokens offsets < num_tokens, so this key is unique
            key[idx] = key_base + st[0]
        base += s.num_pairs
        key_base += s.num_tokens + 1
    return lcp, key


# --- summaries -----------------------------------------------------------------------------------------
def percentiles(x: np.ndarray, q: Sequence[float]) -> list[int]:
    """The ``q``-th percentiles (0-100) of integer values ``x`` (token lengths), the one definition
    that ``pairpack info`` and ``pairpack stats`` share: the smallest value ``v`` of ``x`` with at
    least ``q`` % of ``x`` at most ``v`` (numpy's ``"inverted_cdf"``, Hyndman & Fan's definition 1).
    Every percentile is a length that occurs, and ``max_length = p99`` keeps at least 99% of the
    pairs whole; an interpolated p99 need not (on ``[1, 2, 3, 10, 100]`` it is 96.4, which cuts
    the longest pair)."""
    return [int(v) for v in np.percentile(x, q, method="inverted_cdf")]


def _sparkline(counts: np.ndarray) -> str:
    """One character per bin: blank for 0, else ``▁``..``█`` by count relative to the largest."""
    c = np.asarray(counts, dtype=np.float64)
    if c.size == 0 or c.max() <= 0:
        return " " * c.size
    lv = np.where(c > 0, np.maximum(1, np.ceil(c / c.max() * 8)), 0).astype(int)
    return "".join(SPARK[i] for i in lv)


def _length_summary(x: np.ndarray, bins: int = HIST_BINS) -> dict[str, Any]:
    """p50/p90/p99/max/mean of lengths ``x`` and a histogram over ``[min, p99]`` (values above p99
    are left out of the histogram so one long outlier does not flatten it)."""
    x = np.asarray(x, dtype=np.int64)
    if x.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "min": None,
                "hist": {"edges": [], "counts": []}}
    p50, p90, p99 = percentiles(x, PERCENTILES)
    lo = int(x.min())
    hi = max(p99, lo + 1)
    counts, edges = np.histogram(x[x <= hi], bins=bins, range=(lo, hi))
    return {"min": lo, "p50": p50, "p90": p90, "p99": p99, "max": int(x.max()), "mean": float(x.mean()),
            "hist": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _identical_after(ln: np.ndarray, trunc: Truncation, lcp: np.ndarray, tl: np.ndarray | None = None) -> np.ndarray:
    """bool ``(N,)``: pairs the truncation cut whose completions are then identical (the loader's
    drop rule, :meth:`~pairpack.batch.options.Truncation.cut_to_equal`), decided from the common
    prefix ``K``: the cut completions agree when ``C' <= K``."""
    tl = trunc.lengths(ln) if tl is None else tl
    return trunc.cut_to_equal(ln, tl) & (lcp >= tl[1])


def _truncation_row(lengths: np.ndarray, lcp: np.ndarray, max_length: int, *,
                   min_completion_tokens: int = 1) -> dict[str, Any]:
    """What truncating to ``max_length`` does. Counts are pairs; tokens count both rows (2P + C + R).

    ``truncated``: pairs with ``P + max(C, R) > max_length``. ``become_identical``: truncated pairs
    whose completions are identical after the cut, which the loader drops (as
    :func:`pairpack.batch.plan.identical_after_truncation` decides, from the common prefix ``lcp``);
    ``were_identical`` of them had identical completions before the cut already.
    """
    ln = np.asarray(lengths, dtype=np.int64)
    lcp = np.asarray(lcp, dtype=np.int64)
    trunc = Truncation(max_length, "keep_end", min_completion_tokens)
    tl = trunc.lengths(ln)
    same = _identical_after(ln, trunc, lcp, tl)
    before = (ln[1] == ln[2]) & (lcp >= ln[1])
    real = 2 * ln[0] + ln[1] + ln[2]
    real_t = 2 * tl[0] + tl[1] + tl[2]
    return {"max_length": int(max_length),
            "truncated": int((ln[0] + np.maximum(ln[1], ln[2]) > max_length).sum()),
            "become_identical": int(same.sum()),
            "were_identical": int((same & before).sum()),
            "tokens_dropped": int(real.sum() - real_t.sum()),
            "tokens_total": int(real.sum())}


def padding_row(ds: Any, max_length: int | None, *, batch_size: int | None, max_tokens: int | None,
                seed: int = 0, min_completion_tokens: int = 1) -> dict[str, Any]:
    """Padding efficiency (real tokens / padded tokens, both rows) of epoch 0 of a one-rank
    :class:`~pairpack.Loader` with these options, random and length-grouped: the loader's own order
    (identical-after-truncation pairs left out), its planner's batches, counted by
    :func:`pairpack.batch.plan.padding_efficiency`. Also the ceiling over the same pairs,
    ``sum(2P+C+R) / sum(2(P+max(C,R)))`` (a batch of one pair still pads its shorter completion).

    The loader module imports no torch; building a Loader plans batches and assembles nothing.
    """
    from ..batch.loader import Loader

    lengths = np.asarray(ds.lengths, dtype=np.int64)
    out: dict[str, Any] = {"max_length": max_length}
    for name, grouped in (("random", False), ("grouped", True)):
        ld = Loader(ds, batch_size=batch_size, max_tokens=max_tokens, seed=seed, group_by_length=grouped,
                    max_length=max_length, min_completion_tokens=min_completion_tokens, rank=0, world_size=1)
        batches = ld.batches()
        eff = ld.effective_max_length
        out[name] = float(padding_efficiency(lengths, batches, options=ld.options, truncation=ld.effective_truncation))
        out[f"{name}_batches"] = len(batches)
    used = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    out["effective_max_length"] = eff
    out["pairs_used"] = int(used.size)
    out["dropped_identical"] = int(ld.counts["dropped_identical"])
    out["ceiling"] = float(padding_ceiling(lengths[:, used], eff, min_completion_tokens=min_completion_tokens))
    return out


def layout_rows(ds: Any, max_length: int | None, *, batch_size: int | None, max_tokens: int | None,
                seed: int = 0, min_completion_tokens: int = 1, max_row_tokens: int | None = None) -> dict[str, Any]:
    """Tokens the model processes per pair in each layout (padded, packed, prefix_shared) for epoch 0
    of a one-rank :class:`~pairpack.Loader` with these options, random and length-grouped order
    (:func:`pairpack.batch.plan.tokens_processed` over the planner's batches, padding included),
    the fill (real / processed tokens), and the saving of each layout over grouped padded batches.
    ``ideal`` is the mean ``P + C + R`` after truncation (what prefix sharing needs without padding).
    """
    from ..batch.loader import Loader

    lengths = np.asarray(ds.lengths, dtype=np.int64)
    out: dict[str, Any] = {"max_length": max_length, "max_row_tokens": max_row_tokens, "layouts": {}}
    for layout in LAYOUT_NAMES:
        row: dict[str, Any] = {}
        for name, grouped in (("random", False), ("grouped", True)):
            ld = Loader(ds, batch_size=batch_size, max_tokens=max_tokens, seed=seed, group_by_length=grouped,
                        max_length=max_length, min_completion_tokens=min_completion_tokens, layout=layout,
                        max_row_tokens=None if layout == "padded" else max_row_tokens, rank=0, world_size=1)
            batches = ld.batches()
            pairs = int(sum(len(b) for b in batches))
            done = tokens_processed(lengths, batches, ld.options, ld.effective_truncation)
            row[name] = done / max(pairs, 1)
            if grouped:
                row["fill"] = float(padding_efficiency(lengths, batches, options=ld.options,
                                                       truncation=ld.effective_truncation))
                row["pairs"] = pairs
                if layout == "padded":
                    used = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
                    p, c, r = ld.effective_truncation.lengths(lengths[:, used])
                    out["ideal"] = float((p + c + r).mean()) if used.size else 0.0
        out["layouts"][layout] = row
    base = out["layouts"]["padded"]["grouped"]
    for row in out["layouts"].values():
        row["saving"] = base / row["grouped"] if row["grouped"] else 1.0
    return out


def _delta_summary(lengths: np.ndarray, bins: int = 17) -> dict[str, Any]:
    """Chosen-minus-rejected length ``d = C - R`` (tokens): shares longer/equal/shorter, mean,
    percentiles, and a histogram of about ``bins`` bins over a range symmetric around 0 (``d`` clipped
    to ``[-a, a]``, ``a`` = the larger of ``|p1|`` and ``|p99|``; bins are an odd whole number of
    tokens wide, so 0 is the centre of the centre bin)."""
    ln = np.asarray(lengths, dtype=np.int64)
    d = ln[1] - ln[2]
    n = d.size
    if n == 0:
        return {"n": 0}
    p1, p5, p25, p50, p75, p95, p99 = percentiles(d, (1, 5, 25, 50, 75, 95, 99))
    a = max(abs(p1), abs(p99), 1)
    w = -(-(2 * a + 1) // bins) | 1  # an odd whole number of tokens per bin: 0 is a bin centre
    k = -(-a // w)
    counts, edges = np.histogram(np.clip(d, -a, a), bins=(np.arange(-k, k + 2) - 0.5) * w)
    mean_len = float((ln[1] + ln[2]).mean() / 2)
    return {"n": n, "chosen_longer": int((d > 0).sum()), "equal": int((d == 0).sum()),
            "chosen_shorter": int((d < 0).sum()), "mean": float(d.mean()), "mean_relative": float(d.mean()) / mean_len,
            "p5": p5, "p25": p25, "p50": p50, "p75": p75, "p95": p95, "min": int(d.min()), "max": int(d.max()),
            "hist": {"edges": edges.tolist(), "counts": counts.tolist(), "clipped_to": a}}


def _sharing_summary(prompt_key: np.ndarray, prompt_lengths: np.ndarray) -> dict[str, Any]:
    """Pairs per stored prompt, from the prompt starts (``prompt_key`` equal = one stored prompt).

    The writer de-duplicates prompts within a window (FORMAT.md §7.2), so this counts sharing as
    stored: identical prompts far apart in the input may be stored twice.
    """
    key = np.asarray(prompt_key, dtype=np.int64)
    if key.size == 0:
        return {"pairs": 0, "prompts": 0}
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    saved = int(((counts - 1) * np.asarray(prompt_lengths, dtype=np.int64)[first]).sum())
    groups = {"1": 1, "2": 2, "3-4": 4, "5-8": 8, "9-16": 16, "17+": None}
    dist: dict[str, int] = {}
    lo = 1
    for label, hi in groups.items():
        sel = (counts >= lo) & ((counts <= hi) if hi is not None else True)
        dist[label] = int(sel.sum())
        lo = (hi or 0) + 1
    return {"pairs": int(key.size), "prompts": int(uniq.size), "pairs_per_prompt": key.size / uniq.size,
            "max_pairs_per_prompt": int(counts.max()), "shared_prompts": int((counts > 1).sum()),
            "pairs_with_shared_prompt": int(counts[counts > 1].sum()),
            "prompt_tokens_saved": saved, "prompts_by_pairs": dist}


def default_max_lengths(pair_lengths: np.ndarray, min_completion_tokens: int = 1) -> list[int]:
    """Candidate ``max_length`` values: the p50, p90 and p99 pair lengths rounded up to a multiple of
    64 (p99's is the suggestion, see :func:`suggest_max_length`), plus powers of two from the one
    below the median's up to the first that keeps every pair whole (at most 5 of them)."""
    x = np.asarray(pair_lengths, dtype=np.int64)
    if x.size == 0:
        return []
    p50, p90, p99 = percentiles(x, PERCENTILES)
    top = max(int(x.max()), 2)
    ladder = [1 << e for e in range(max(1, int(math.log2(max(p50, 2))) - 1), math.ceil(math.log2(top)) + 1)]
    cands = ladder[-5:] + [max(64, -(-q // 64) * 64) for q in (p50, p90, p99)]
    return sorted(set(c for c in cands if c >= min_completion_tokens + 1))


def suggest_max_length(pair_lengths: np.ndarray, keep: float = 99.0, multiple: int = 64) -> int:
    """The smallest multiple of ``multiple`` that keeps at least ``keep`` % of pairs whole
    (pair length ``P + max(C, R)``)."""
    x = np.asarray(pair_lengths, dtype=np.int64)
    if x.size == 0:
        return multiple
    q = percentiles(x, [keep])[0]
    return max(multiple, -(-q // multiple) * multiple)


# --- the whole report --------------------------------------------------------------------------------
ROWS = ("prompt", "chosen", "rejected", "prompt+chosen", "prompt+rejected", "pair")


@dataclass
class DatasetStats:
    """Everything ``pairpack stats`` reports; see :func:`compute_stats`. ``to_json()`` is the
    ``--json`` output and :meth:`render` the text tables."""

    path: str
    num_pairs: int
    min_completion_tokens: int
    lengths: dict[str, dict[str, Any]]
    identical_before: int
    suggested_max_length: int
    truncation: list[dict[str, Any]]
    padding: list[dict[str, Any]]
    batching: dict[str, Any]
    layouts: dict[str, Any]
    delta: dict[str, Any]
    sharing: dict[str, Any]
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Every statistic as a JSON-ready dict (what ``pairpack stats --json`` prints)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def render(self) -> str:
        """Aligned text tables with small unicode histograms."""
        return _render(self)


def compute_stats(ds: Any, *, max_lengths: Sequence[int] | None = None, batch_size: int | None = None,
                  max_tokens: int | None = None, seed: int = 0, min_completion_tokens: int = 1,
                  padding: bool = True, max_row_tokens: int | None = None) -> DatasetStats:
    """Compute the ``pairpack stats`` report for an open :class:`~pairpack.Dataset`.

    Args:
        ds: the dataset.
        max_lengths: candidate ``max_length`` values; None picks powers of two around the data plus
            the suggestion (smallest multiple of 64 keeping 99% of pairs whole).
        batch_size: pairs per batch, as the loader would batch (per rank); the default when
            neither this nor ``max_tokens`` is given is 32.
        max_tokens: a token budget per batch instead of ``batch_size``.
        seed: the loader seed whose epoch-0 order is used for random batching.
        min_completion_tokens: the loader's floor when cutting completions (default 1).
        padding: False skips the padding and layout sections.
        max_row_tokens: the row bound of the packed layouts in the layout section (None: a batch
            may be one row; 0: one pair per row).
    """
    if batch_size is None and max_tokens is None:
        batch_size = DEFAULT_BATCH_SIZE
    ln = np.asarray(ds.lengths, dtype=np.int64)
    p, c, r = ln
    pair = p + np.maximum(c, r)
    rows = dict(zip(ROWS, (p, c, r, p + c, p + r, pair)))
    lcp, key = dataset_common_prefix(ds)
    cands = sorted(set(max_lengths)) if max_lengths else default_max_lengths(pair, min_completion_tokens)
    suggestion = suggest_max_length(pair)
    trunc = [_truncation_row(ln, lcp, L, min_completion_tokens=min_completion_tokens) for L in cands]
    pad_rows: list[dict[str, Any]] = []
    lay: dict[str, Any] = {}
    if padding and len(ds):
        lay = layout_rows(ds, None, batch_size=batch_size, max_tokens=max_tokens, seed=seed,
                          min_completion_tokens=min_completion_tokens, max_row_tokens=max_row_tokens)
        pad_lengths = [None] + (list(cands) if max_lengths else [suggestion])
        pad_rows = [padding_row(ds, L, batch_size=batch_size, max_tokens=max_tokens, seed=seed,
                                min_completion_tokens=min_completion_tokens) for L in pad_lengths]
    return DatasetStats(
        path=str(ds.path), num_pairs=len(ds), min_completion_tokens=min_completion_tokens,
        lengths={k: _length_summary(v) for k, v in rows.items()},
        identical_before=int(((c == r) & (lcp >= c)).sum()),
        suggested_max_length=suggestion, truncation=trunc, padding=pad_rows, layouts=lay,
        batching={"batch_size": batch_size, "max_tokens": max_tokens, "seed": seed, "epoch": 0},
        delta=_delta_summary(ln), sharing=_sharing_summary(key, p),
        _arrays={"lengths": ln, "lcp": lcp},
    )


# --- text ------------------------------------------------------------------------------------------------
def _table(rows: list[list[str]], align: str = "") -> list[str]:
    return text_table(rows, align, indent="  ")


def _share(k: int, n: int) -> str:
    return f"{k:,} ({100 * k / n:.1f}%)" if n else f"{k:,}"


def _render(s: DatasetStats) -> str:
    n = s.num_pairs
    out = [f"dataset  {s.path}: {n:,} pairs", ""]
    if n == 0:
        return "\n".join(out + ["(empty dataset: nothing to report)"])
    out.append("lengths (tokens; 'pair' = P + max(C, R), the padded length a pair needs)")
    rows = [["", "p50", "p90", "p99", "max", "mean", "min", "histogram", "p99"]]
    for name, v in s.lengths.items():
        h = v["hist"]
        rows.append([name, f"{v['p50']:,}", f"{v['p90']:,}", f"{v['p99']:,}", f"{v['max']:,}", f"{v['mean']:,.1f}",
                     f"{v['min']:,}", _sparkline(np.array(h["counts"])), f"{v['p99']:,}"])
    out += _table(rows, "lrrrrrrll") + [""]

    out.append(f"truncation (completions cut first, down to {s.min_completion_tokens} token(s); "
               "then the prompt; tokens count both rows)")
    rows = [["max_length", "pairs truncated", "become identical", "tokens dropped", ""]]
    for t in s.truncation:
        rows.append([f"{t['max_length']:,}", _share(t["truncated"], n), _share(t["become_identical"], n),
                     f"{100 * t['tokens_dropped'] / max(t['tokens_total'], 1):.2f}%",
                     "<- suggested" if t["max_length"] == s.suggested_max_length else ""])
    out += _table(rows, "lrrrl")
    out.append("  ('become identical': chosen == rejected after the cut; the loader drops these pairs)")
    out.append(f"  suggested max_length {s.suggested_max_length:,}: the smallest multiple of 64 that keeps "
               f"99% of pairs whole")
    if s.identical_before:
        out.append(f"  {s.identical_before:,} pair(s) have identical chosen and rejected before any truncation")
    out.append("")

    if s.padding:
        b = s.batching
        how = f"batch_size {b['batch_size']}" if b["batch_size"] else f"max_tokens {b['max_tokens']:,}"
        out.append(f"padding efficiency (real / padded tokens, both rows; the loader's planner, {how}, "
                   f"seed {b['seed']}, epoch 0)")
        rows = [["max_length", "random", "grouped", "ceiling", "grouped/ceiling", "batches (random/grouped)"]]
        for pr in s.padding:
            label = "none" if pr["max_length"] is None else f"{pr['max_length']:,}"
            if pr["effective_max_length"] != pr["max_length"]:  # a token budget caps the length
                label += f" (cap {pr['effective_max_length']:,})"
            rows.append([label,
                         f"{100 * pr['random']:.1f}%", f"{100 * pr['grouped']:.1f}%", f"{100 * pr['ceiling']:.1f}%",
                         f"{100 * pr['grouped'] / pr['ceiling']:.1f}%",
                         f"{pr['random_batches']:,} / {pr['grouped_batches']:,}"])
        out += _table(rows) + [""]

    if s.layouts:
        lay = s.layouts
        bound = lay["max_row_tokens"]
        rows_txt = "rows up to the budget" if bound is None else ("one pair per row" if bound == 0 else
                                                                  f"rows of at most {bound:,} tokens")
        out.append(f"layouts (tokens the model processes per pair, padding included; {how}, {rows_txt}; "
                   f"mean P+C+R {lay['ideal']:,.1f})")
        rows = [["layout", "random", "grouped", "fill (grouped)", "saving vs grouped padded", "x mean P+C+R"]]
        for name, row in lay["layouts"].items():
            rows.append([name.replace("_", " "), f"{row['random']:,.1f}", f"{row['grouped']:,.1f}",
                         f"{100 * row['fill']:.1f}%", f"{row['saving']:.2f}x",
                         f"{row['grouped'] / lay['ideal']:.2f}" if lay["ideal"] else "-"])
        out += _table(rows, "lrrrrr") + [""]

    d = s.delta
    out.append("chosen - rejected length (tokens; a systematic gap is a known source of length bias)")
    h = d["hist"]
    out += _table([
        ["chosen longer", _share(d["chosen_longer"], n), "mean", f"{d['mean']:+,.1f}",
         f"({100 * d['mean_relative']:+.1f}% of the mean completion)"],
        ["equal", _share(d["equal"], n), "median", f"{d['p50']:+,}", ""],
        ["chosen shorter", _share(d["chosen_shorter"], n), "p5 .. p95", f"{d['p5']:+,} .. {d['p95']:+,}", ""],
    ], "lrlrl")
    out.append(f"  histogram  {-h['clipped_to']:+,} {_sparkline(np.array(h['counts']))} {h['clipped_to']:+,}"
               "  (centre bin = equal length; tails clipped into the end bins)")
    out.append("")

    sh = s.sharing
    out.append("prompt sharing (as stored: the writer de-duplicates prompts within a window)")
    out.append(f"  {sh['pairs']:,} pairs over {sh['prompts']:,} stored prompts: {sh['pairs_per_prompt']:.2f} pairs per "
               f"prompt (max {sh['max_pairs_per_prompt']:,})")
    out.append(f"  {_share(sh['pairs_with_shared_prompt'], n)} pairs share their prompt with another pair; "
               f"{sh['prompt_tokens_saved']:,} prompt tokens saved by storing each once")
    dist = sh["prompts_by_pairs"]
    out += _table([["pairs per prompt"] + list(dist), ["prompts"] + [f"{v:,}" for v in dist.values()]])
    return "\n".join(out)


# --- picture ---------------------------------------------------------------------------------------------
def plot_stats(s: DatasetStats, path: str | Path, *, dpi: int = 100) -> Path:
    """Write a PNG: length histograms, the truncation curve, and the chosen-minus-rejected histogram.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install "pairpack[plot]"``).
    """
    import_optional("matplotlib", feature="--plot", extra="plot").use("Agg")
    import matplotlib.pyplot as plt
    ln = s._arrays["lengths"]
    lcp = s._arrays["lcp"]
    p, c, r = ln
    pair = p + np.maximum(c, r)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=dpi)
    ax = axes[0]
    top = max(int(pair.max()), 2)
    edges = np.linspace(0, top, 49)
    for name, x in (("prompt", p), ("chosen", c), ("rejected", r), ("pair P+max(C,R)", pair)):
        ax.hist(x, bins=edges, histtype="step", linewidth=1.4, label=name)
    ax.set(title="lengths", xlabel="tokens", ylabel="pairs")
    ax.legend(fontsize=8, frameon=False)

    ax = axes[1]
    grid = np.unique(np.linspace(s.min_completion_tokens + 1, top + 1, 160).astype(np.int64))
    srt = np.sort(pair)
    trunc = 100 * (len(pair) - np.searchsorted(srt, grid, side="right")) / max(len(pair), 1)
    real = (2 * p + c + r).sum()
    ident, dropped = [], []
    for L in grid:
        cut = Truncation(int(L), "keep_end", s.min_completion_tokens)
        tl = cut.lengths(ln)
        ident.append(100 * _identical_after(ln, cut, lcp, tl).sum() / max(len(pair), 1))
        dropped.append(100 * (real - (2 * tl[0] + tl[1] + tl[2]).sum()) / max(real, 1))
    ax.plot(grid, trunc, label="pairs truncated")
    ax.plot(grid, dropped, label="tokens dropped")
    ax.plot(grid, ident, label="pairs made identical")
    ax.axvline(s.suggested_max_length, color="0.4", linestyle="--", linewidth=1)
    ax.annotate(f"suggested {s.suggested_max_length}", (s.suggested_max_length, 97), fontsize=8,
                xytext=(-4, 0), textcoords="offset points", va="top", ha="right")
    ax.set(title="truncation", xlabel="max_length (tokens)", ylabel="% of pairs / tokens", ylim=(0, 100))
    ax.legend(fontsize=8, frameon=False, loc="lower left")

    ax = axes[2]
    d = c - r
    a = s.delta["hist"]["clipped_to"]
    w = -(-(2 * a + 1) // 41) | 1  # an odd whole number of tokens per bin: 0 is a bin centre, no aliasing
    k = -(-a // w)
    ax.hist(np.clip(d, -a, a), bins=(np.arange(-k, k + 2) - 0.5) * w, color="C2")
    ax.axvline(0, color="0.3", linewidth=1)
    ax.set(title=f"chosen - rejected (mean {s.delta['mean']:+.1f})", xlabel="tokens (tails clipped)", ylabel="pairs")
    fig.suptitle(f"pairpack stats {Path(s.path).name}: {s.num_pairs:,} pairs", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=dpi)
    plt.close(fig)
    return out
