"""``pairpack overlap A B``: how many of B's prompts (and pairs) occur in A.

Prompts are compared by token ids (:func:`pairpack.read.prompts.prompt_keys`) when both datasets
share a tokenizer (the same ids mean the same text), else by normalised decoded text (Unicode
NFKC, case-folded, runs of white space as one space, stripped), which needs both tokenizers.
"""

from __future__ import annotations

import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xxhash

from .. import format as fmt
from ..errors import ArgumentError
from ..read.dataset import Dataset, open_dataset
from ..read.prompts import prompt_keys

__all__ = ["OverlapReport", "overlap", "normalise"]

_SPACE = re.compile(r"\s+")


@dataclass
class OverlapReport:
    """B's prompts (distinct) and pairs, and how many of each occur in A; ``by`` is ``"ids"`` or ``"text"``."""

    a: str
    b: str
    by: str
    b_prompts: int
    b_pairs: int
    shared_prompts: int
    shared_pairs: int
    a_prompts: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dict (what ``pairpack overlap --json`` prints)."""
        return asdict(self)

    def summary(self) -> str:
        """The report as the lines ``pairpack overlap`` prints."""
        def pct(x: int, n: int) -> str:
            return f"{x / n:.2%}" if n else "-"

        return (f"overlap of {self.b} with {self.a} (by {'token ids' if self.by == 'ids' else 'normalised text'}):\n"
                f"  prompts  {self.shared_prompts:,} of {self.b_prompts:,} in B occur in A ({pct(self.shared_prompts, self.b_prompts)})\n"
                f"  pairs    {self.shared_pairs:,} of {self.b_pairs:,} in B have a prompt of A ({pct(self.shared_pairs, self.b_pairs)})\n"
                f"  A has {self.a_prompts:,} distinct prompts; {self.seconds:.2f} s")


def normalise(text: str) -> str:
    """The text form prompts are compared in across tokenizers: NFKC, case-folded, white space folded."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _text_keys(ds: Dataset) -> np.ndarray:
    """uint64 ``(N,)``: xxh3-64 of each pair's normalised decoded prompt (each distinct prompt decoded once)."""
    if ds.tokenizer is None:
        raise ArgumentError(f"{ds.path}: the datasets have different tokenizers, so prompts are compared as "
                            f"text, but this dataset's tokenizer is unknown ({ds.manifest.tokenizer!r}): "
                            f"cannot decode its ids")
    ids = prompt_keys(ds._live())
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    h = xxhash.xxh3_64_intdigest
    keys = np.fromiter((h(normalise(ds.decode(ds[int(i)].prompt)).encode()) for i in first.tolist()),
                       dtype=np.uint64, count=len(first))
    return keys[inv.reshape(-1)]


def overlap(a: str | os.PathLike | Dataset, b: str | os.PathLike | Dataset, *, by: str = "auto") -> OverlapReport:
    """How many of B's distinct prompts, and of B's pairs, have a prompt that occurs in A.

    Args:
        a: a dataset or its path, e.g. the training data.
        b: a dataset or its path, e.g. an eval set or a benchmark: its prompts are looked up in ``a``.
        by: ``"ids"``, ``"text"`` or ``"auto"`` (ids when both record the same tokenizer,
            vocabulary and token dtype, else text).

    Two different prompts are counted as one with probability about ``2**-64`` per pair of
    prompts (64-bit keys).
    """
    t0 = time.perf_counter()
    da = a if isinstance(a, Dataset) else open_dataset(a)
    db = b if isinstance(b, Dataset) else open_dataset(b)
    same = (fmt.tokenizer_key(da.manifest.tokenizer) == fmt.tokenizer_key(db.manifest.tokenizer)
            and da.manifest.vocab_size == db.manifest.vocab_size and da.token_dtype == db.token_dtype)
    if by == "auto":
        by = "ids" if same else "text"
    if by not in ("ids", "text"):
        raise ArgumentError(f"by must be auto, ids or text, got {by!r}")
    if by == "ids" and not same:
        raise ArgumentError(f"{da.path} and {db.path} record different tokenizers (or vocabularies): the same ids "
                            f"are other text; compare by text")
    keys = (lambda d: prompt_keys(d._live())) if by == "ids" else _text_keys
    ka, kb = np.unique(keys(da)), keys(db)
    ub = np.unique(kb)
    hit_b = np.isin(kb, ka)
    return OverlapReport(str(da.path), str(db.path), by, int(ub.size), int(kb.size),
                         int(np.isin(ub, ka, assume_unique=True).sum()), int(hit_b.sum()), int(ka.size),
                         time.perf_counter() - t0)
