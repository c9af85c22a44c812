"""The options that shape batches, modelled once: :class:`Truncation` and :class:`PlanOptions`.

Every place that makes or describes batches (the Loader, ``Collate``, ``Dataset.batch``, the
reference cache, ``pairpack stats``) takes these two frozen objects; the public keyword arguments
(``max_length=``, ``batch_size=`` ...) are mapped onto them by :func:`truncation_from` and
:func:`plan_options_from`. Torch-free: only numpy.

Truncation rule (``max_length``), identical for both rows of a pair: if ``P + C`` or ``P + R``
exceeds ``max_length``, completions are cut first (from their end) down to
``min_completion_tokens``, then the prompt loses tokens from its start (``keep_end``) or its end
(``keep_start``). Since ``max_length > min_completion_tokens`` is required, ``P >= 1`` and both
completions keep ``>= 1`` token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import ArgumentError, OversizeError
from ..format.spec import round_up

__all__ = ["TRUNCATION_MODES", "OVERSIZE_MODES", "LAYOUTS", "Truncation", "PlanOptions", "OversizeError",
           "truncation_from", "plan_options_from", "NO_TRUNCATION"]

TRUNCATION_MODES = ("keep_end", "keep_start")
"""Which end of the prompt truncation keeps: ``"keep_end"`` drops tokens from its start."""
OVERSIZE_MODES = ("truncate", "skip", "error")
"""What a token budget does with a pair over it alone: truncate it to fit, skip it (counted), raise."""
LAYOUTS = ("padded", "packed", "prefix_shared")
"""The batch layouts (docs/layouts.md)."""


def _int_or_none(name: str, v: Any, lo: int) -> None:
    if v is None:
        return
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ArgumentError(f"{name} must be an int or None, got {v!r}")
    if v < lo:
        raise ArgumentError(f"{name} must be >= {lo}, got {v}")


@dataclass(frozen=True)
class Truncation:
    """How pairs are cut to ``max_length`` tokens per row (see the module docstring).

    Attributes:
        max_length: longest row ``P + max(C, R)`` after truncation, or None (no truncation).
        mode: ``"keep_end"`` (drop prompt tokens from its start) or ``"keep_start"``.
        min_completion_tokens: completions are cut no shorter than this (``>= 1``) before the prompt.
    """

    max_length: int | None = None
    mode: str = "keep_end"
    min_completion_tokens: int = 1

    def __post_init__(self) -> None:
        if self.mode not in TRUNCATION_MODES:
            raise ArgumentError(f"truncation must be one of {TRUNCATION_MODES}, got {self.mode!r}")
        _int_or_none("min_completion_tokens", self.min_completion_tokens, 1)
        if self.min_completion_tokens is None:
            raise ArgumentError("min_completion_tokens must be an int >= 1, got None")
        _int_or_none("max_length", self.max_length, -(1 << 62))
        if self.max_length is not None and self.max_length < self.min_completion_tokens + 1:
            raise ArgumentError(f"max_length={self.max_length} leaves no room for a prompt token and "
                             f"min_completion_tokens={self.min_completion_tokens} (need max_length >= "
                             f"min_completion_tokens + 1 = {self.min_completion_tokens + 1})")

    @property
    def active(self) -> bool:
        """Whether pairs are truncated at all (``max_length`` is set)."""
        return self.max_length is not None

    def capped(self, cap: int | None) -> "Truncation":
        """This truncation with ``max_length`` lowered to ``cap`` (None: unchanged)."""
        if cap is None or (self.max_length is not None and self.max_length <= cap):
            return self
        return replace(self, max_length=cap)

    def apply(self, p: np.ndarray, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompt, chosen and rejected lengths (int64 arrays of one shape) after truncation."""
        m = self.max_length
        if m is None:
            return p, c, r
        cap = np.maximum(m - p, self.min_completion_tokens)
        c2, r2 = np.minimum(c, cap), np.minimum(r, cap)
        p2 = np.minimum(p, m - np.maximum(c2, r2))
        return p2, c2, r2

    def lengths(self, lengths: np.ndarray) -> np.ndarray:
        """int64 ``(3, N)``: ``lengths`` (rows prompt/chosen/rejected) after truncation."""
        ln = np.asarray(lengths, dtype=np.int64)
        if self.max_length is None:
            return ln
        return np.stack(self.apply(ln[0], ln[1], ln[2]))

    def row_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """int64 ``(N,)``: the padded length one pair needs, ``P' + max(C', R')``."""
        p, c, r = self.apply(lengths[0], lengths[1], lengths[2])
        return p + np.maximum(c, r)

    def cut_to_equal(self, lengths: np.ndarray, cut: np.ndarray | None = None) -> np.ndarray:
        """bool ``(N,)``: pairs whose completions this truncation cut to one length ``C' = R'``.

        The identical-after-truncation rule has one home: such a pair is dropped exactly when its
        completions agree on their first ``C'`` tokens (completions are cut from their end), which
        the callers check against tokens or a common-prefix length. ``cut`` may pass
        :meth:`lengths` of ``lengths`` already computed.
        """
        ln = np.asarray(lengths, dtype=np.int64)
        if self.max_length is None:
            return np.zeros(ln.shape[1], dtype=bool)
        tl = self.lengths(ln) if cut is None else cut
        return ((tl[1] < ln[1]) | (tl[2] < ln[2])) & (tl[1] == tl[2])

    def prompt_offset(self, prompt_lengths: np.ndarray, cut_prompt: np.ndarray) -> np.ndarray | int:
        """Tokens skipped at the prompt's start: ``P - P'`` for ``keep_end``, else 0."""
        return prompt_lengths - cut_prompt if self.mode == "keep_end" and self.max_length is not None else 0

    def settings(self) -> dict[str, Any]:
        """The settings a reference cache records (mode and minimum are None without ``max_length``,
        where they have no effect, so they never cause a spurious mismatch)."""
        on = self.max_length is not None
        return {"max_length": self.max_length, "truncation": self.mode if on else None,
                "min_completion_tokens": self.min_completion_tokens if on else None}


NO_TRUNCATION = Truncation()
"""The truncation that cuts nothing (``max_length=None``)."""


@dataclass(frozen=True)
class PlanOptions:
    """How an epoch is cut into batches and how each batch is laid out.

    Attributes:
        batch_size: pairs per batch (per rank). Exactly one of ``batch_size`` / ``max_tokens``.
        max_tokens: per-batch budget on the tokens the model processes: padded layout
            ``2 * B * L`` (both rows, padded length ``L``); packed layouts ``R * T`` (rows times
            row length, see :mod:`pairpack.batch.layouts`).
        group_by_length: sort pairs by length within windows of the shuffled order, then shuffle
            the batches.
        window: grouping window in pairs (None: 512 batches per rank).
        drop_last: ``DistributedSampler`` semantics (trim instead of repeating; drop a short
            last batch with ``batch_size``).
        shuffle: random epoch order (else dataset order).
        oversize: with ``max_tokens``, a pair over the budget alone is ``"truncate"``-d,
            ``"skip"``-ped or raises :class:`OversizeError` (``"error"``).
        pad_to_multiple_of: round each padded length up to a multiple of this.
        layout: ``"padded"`` (:class:`~pairpack.Triplets`), ``"packed"`` or ``"prefix_shared"``
            (:class:`~pairpack.batch.layouts.PackedBatch`).
        max_row_tokens: packed layouts: the longest row (None: one row holds the whole batch
            budget, or the longest pair when batching by count); 0: one pair per row.
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    group_by_length: bool = False
    window: int | None = None
    drop_last: bool = False
    shuffle: bool = True
    oversize: str = "truncate"
    pad_to_multiple_of: int | None = None
    layout: str = "padded"
    max_row_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.max_tokens is not None:
            raise ArgumentError("give exactly one of batch_size (pairs per batch) and max_tokens (token budget)")
        _int_or_none("batch_size", self.batch_size, 1)
        _int_or_none("max_tokens", self.max_tokens, 1)
        _int_or_none("window", self.window, 1)
        _int_or_none("pad_to_multiple_of", self.pad_to_multiple_of, 1)
        _int_or_none("max_row_tokens", self.max_row_tokens, 0)
        if self.oversize not in OVERSIZE_MODES:
            raise ArgumentError(f"oversize must be one of {OVERSIZE_MODES}, got {self.oversize!r}")
        if self.layout not in LAYOUTS:
            raise ArgumentError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.max_row_tokens is not None and self.layout == "padded":
            raise ArgumentError("max_row_tokens applies to layout='packed' or 'prefix_shared' only")

    def require_size(self) -> None:
        """Raise ValueError unless exactly one of ``batch_size``/``max_tokens`` is set (planning needs one)."""
        if (self.batch_size is None) == (self.max_tokens is None):
            raise ArgumentError("give exactly one of batch_size (pairs per batch) and max_tokens (token budget)")

    @property
    def packed(self) -> bool:
        """Whether the layout is one of the packed ones (``packed``, ``prefix_shared``)."""
        return self.layout != "padded"

    def pair_tokens(self, p: Any, c: Any, r: Any) -> Any:
        """Tokens one pair occupies in its layout, without padding: padded ``2 * (P + max(C, R))``
        rounded to the multiple per row; packed ``2P + C + R``; prefix_shared ``P + C + R``."""
        if self.layout == "packed":
            return 2 * p + c + r
        if self.layout == "prefix_shared":
            return p + c + r
        return 2 * round_up(p + np.maximum(c, r), self.pad_to_multiple_of)

    def row_bound(self) -> int | None:
        """Capacity of one row of a packed layout, rounded down to the multiple: ``max_row_tokens``,
        else ``max_tokens`` (one row may hold the batch); 0: one pair per row; None: unbounded."""
        cap = self.max_row_tokens if self.max_row_tokens is not None else self.max_tokens
        m = self.pad_to_multiple_of
        return cap // m * m if cap and m else cap

    def row_cap(self) -> int | None:
        """The most tokens one pair may take alone in a packed layout (None: unbounded)."""
        b = self.row_bound()
        if b == 0:  # one pair per row: the batch budget bounds it
            m = self.pad_to_multiple_of
            return None if self.max_tokens is None else (self.max_tokens // m * m if m else self.max_tokens)
        return b

    def length_cap(self) -> int | None:
        """The longest row ``P + max(C, R)`` a pair may keep so that it fits the budget alone
        (None: no budget). Padded: ``floor(max_tokens / 2)`` rounded down to the multiple; packed
        layouts: half the row bound, rounded down to the multiple (``2P + C + R`` and
        ``P + C + R`` are both at most ``2 (P + max(C, R))``)."""
        m = self.pad_to_multiple_of
        if self.layout == "padded":
            if self.max_tokens is None:
                return None
            return self.max_tokens // 2 // m * m if m else self.max_tokens // 2
        cap = self.row_cap()
        return None if cap is None else cap // 2

    def max_length_cap(self, truncation: "Truncation") -> "Truncation":
        """The truncation actually applied: with a budget and ``oversize="truncate"`` a pair must
        fit alone, so ``max_length`` is capped at :meth:`length_cap`."""
        if self.oversize != "truncate":
            return truncation
        return truncation.capped(self.length_cap())


def truncation_from(truncation: "Truncation | str | None" = None, *, max_length: int | None = None,
                    min_completion_tokens: int = 1) -> Truncation:
    """A :class:`Truncation` from either the object or the public keywords (``truncation`` may be
    the mode string, as the keyword API takes it). Giving the object and keywords that differ from
    their defaults is an error."""
    if isinstance(truncation, Truncation):
        if max_length is not None or min_completion_tokens != 1:
            raise ArgumentError("give a Truncation object or max_length/min_completion_tokens, not both")
        return truncation
    return Truncation(max_length, "keep_end" if truncation is None else truncation, min_completion_tokens)


_PLAN_DEFAULTS = {f: getattr(PlanOptions(), f) for f in PlanOptions.__dataclass_fields__}


def plan_options_from(options: PlanOptions | None = None, **kw: Any) -> PlanOptions:
    """A :class:`PlanOptions` from the object or the public keywords (not both)."""
    given = {k: v for k, v in kw.items() if v != _PLAN_DEFAULTS[k]}
    if options is not None:
        if given:
            raise ArgumentError(f"give a PlanOptions object or the keywords {sorted(given)}, not both")
        return options
    return PlanOptions(**kw)


_TRUNC_KEYS = ("max_length", "truncation", "min_completion_tokens")


def options_from(options: PlanOptions | None = None, truncation: "Truncation | str | None" = None,
                 **kw: Any) -> tuple[PlanOptions, Truncation]:
    """``(PlanOptions, Truncation)`` from the objects, or from the public keyword arguments
    (``batch_size=``, ``max_length=``, ``truncation="keep_end"`` ...) that map onto them."""
    tkw = {k: kw.pop(k) for k in _TRUNC_KEYS if k in kw}
    if "truncation" in tkw:
        if truncation is not None:
            raise ArgumentError("truncation given twice")
        truncation = tkw.pop("truncation")
    return plan_options_from(options, **kw), truncation_from(truncation, **tkw)
