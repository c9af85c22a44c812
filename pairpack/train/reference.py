"""Reference log-prob cache: run the frozen reference model once, store its log-probs as columns.

DPO needs ``log pi_ref(completion | prompt)`` for every chosen and rejected completion. The
reference model never changes, so :func:`precompute_reference` computes these once, in index
order, and stores them in the dataset as two float32 per-pair columns (FORMAT.md §4.4):

* ``ref_chosen_logp``  (N,) float32, nats: reference log-prob of each chosen completion;
* ``ref_rejected_logp`` (N,) float32, nats: likewise for the rejected completion.

Both columns carry the same ``attrs`` that identify what produced them: the hash of the model's
weights (:func:`model_hash`), the reduction (``"sum"`` or ``"mean"``, see
:func:`pairpack.dpo.sequence_logprobs`), the truncation settings, and the dataset fingerprint.
A training loop then asks for them with every batch and passes them to ``DPO`` instead of
running a reference model::

    ds = precompute_reference(ds, model, batch_size=32, reduction="mean", max_length=1024)  # once
    dpo = DPO(model, reduction="mean", ref_model=False)        # no reference model in memory
    loader = pairpack.Loader(ds, batch_size=8, max_length=1024, columns=REFERENCE_COLUMNS)
    check_loader(loader, dpo)                                  # at start-up: same settings?
    for batch in loader:
        loss = dpo(**batch.as_kwargs(), **reference_kwargs(batch))

:func:`check_loader` / :func:`check_reference` raise :class:`~pairpack.errors.StateError`
naming the setting that differs when the cache was made under other settings (reduction,
truncation, model hash, another dataset). Without a loader: ``ds.batch(idx,
columns=REFERENCE_COLUMNS)`` and ``check_reference(ds, reduction=..., max_length=...)``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor, nn

from .._version import __version__
from ..batch import plan as bt
from ..batch.options import LAYOUTS, Truncation, truncation_from
from ..errors import ArgumentError, StateError
from ..progress import CountProgress
from ..read.dataset import Dataset, open_dataset
from ..write.columns import add_columns
from .dpo import REDUCTIONS, batch_logprobs

__all__ = [
    "REF_CHOSEN",
    "REF_REJECTED",
    "REFERENCE_COLUMNS",
    "check_loader",
    "check_reference",
    "model_hash",
    "precompute_reference",
    "reference_columns",
    "reference_kwargs",
]

REF_CHOSEN = "ref_chosen_logp"
"""The column of cached reference log-probs of the chosen completions (float32, nats)."""
REF_REJECTED = "ref_rejected_logp"
"""The column of cached reference log-probs of the rejected completions (float32, nats)."""
REFERENCE_COLUMNS: tuple[str, str] = (REF_CHOSEN, REF_REJECTED)
"""Both cache columns: pass them as ``Loader(columns=...)`` so batches carry them."""
_CACHE_KIND = "pairpack.reference_logp"
_CACHE_VERSION = 1


def model_hash(model: nn.Module) -> str:
    """xxh3-128 (32 hex digits) of a model's weights: ``state_dict`` entries in key order.

    For each entry the key, dtype and shape are hashed, then the tensor's raw bytes (any dtype,
    bfloat16 included; copied to the CPU). It identifies the weights, not the code: two models
    with equal state dicts and different ``forward`` methods hash alike.
    """
    h = xxhash.xxh3_128()
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            t = value.detach()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                flat = t.reshape(-1).contiguous().cpu()
                h.update(flat.view(torch.uint8).numpy().data)
        else:  # extra state (rare): its repr is the best stable identity available
            h.update(f"{key}|{type(value).__name__}|{value!r}\n".encode())
    return h.hexdigest()


def _truncation(max_length: int | None, truncation: Truncation | str, min_completion_tokens: int) -> Truncation:
    """The :class:`~pairpack.batch.options.Truncation` of the keywords (or the object itself)."""
    return truncation_from(truncation, max_length=max_length, min_completion_tokens=min_completion_tokens)


def _settings(reduction: str, trunc: Truncation) -> dict[str, Any]:
    return {"reduction": reduction, **trunc.settings()}


def _batch_logps(model: nn.Module, batch: Any, reduction: str, device: torch.device,
                 attention: str = "auto") -> tuple[Tensor, Tensor]:
    """Reference log-probs ``(B,)`` of chosen and rejected, computed as ``DPO.forward`` does (any layout)."""
    return batch_logprobs(model, batch.to(device), reduction=reduction, attention=attention)  # type: ignore[arg-type]


@torch.no_grad()
def precompute_reference(
    ds: Dataset | str | os.PathLike,
    model: nn.Module,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    reduction: str = "mean",
    max_length: int | None = None,
    truncation: Truncation | str = "keep_end",
    min_completion_tokens: int = 1,
    layout: str = "padded",
    max_row_tokens: int | None = 0,
    attention: str = "auto",
    progress: bool | None = None,
) -> Dataset:
    """Run ``model`` once over the dataset and store its log-probs as reference columns.

    Pairs are visited in index order, ``batch_size`` at a time via ``ds.batch``, the model in
    eval mode under ``torch.no_grad`` (its mode is restored afterwards). Each completion's
    log-prob is computed exactly as :class:`~pairpack.dpo.DPO` computes it for its reference
    (one forward on the concatenated chosen and rejected rows, targets aligned as in
    :func:`~pairpack.dpo.sequence_logprobs`), then stored as float32 columns ``ref_chosen_logp``
    and ``ref_rejected_logp`` with :func:`pairpack.write.columns.add_columns` (atomic, checksummed;
    an earlier cache is replaced). The attrs of both columns record the model hash, reduction,
    truncation settings, dataset fingerprint and pairpack version.

    Args:
        ds: an open dataset or its path. It is not modified in memory: use the returned one.
        model: the reference model, mapping int64 ids ``(R, N)`` to logits ``(R, N, V)``; causal.
        batch_size: pairs per forward (each forward runs ``2 * batch_size`` rows).
        device: where batches are sent; default the device of the model's first parameter
            (CPU for a model without parameters). The model itself is not moved.
        reduction: ``"mean"`` (nats per token) or ``"sum"`` (nats per sequence); it must be the
            reduction of the ``DPO`` module that will use the cache.
        max_length: the truncation of the training loader (``Loader.effective_max_length``,
            which a token budget can set even when ``max_length`` is None); pairs are truncated
            exactly as the loader does (:func:`pairpack.batch.plan.make_plan`), so the cached
            log-probs score the tokens the policy will see. Pairs the loader drops (identical
            after truncation) get values too.
        truncation: the loader's ``truncation`` (a mode, or a Truncation object).
        min_completion_tokens: the loader's ``min_completion_tokens``.
        layout: the batch layout the reference runs on (``"padded"``, ``"packed"``,
            ``"prefix_shared"``; docs/layouts.md). Every layout stores the same columns with the
            same values (up to float summation order), so the cache serves a training run of any
            layout; ``prefix_shared`` runs the model on ``P + C + R`` tokens per pair instead of
            ``2 (P + max(C, R))``.
        max_row_tokens: for the packed layouts, the longest row (default 0: one pair per row, the
            fastest with dense masks).
        attention: how packed layouts reach the model (:func:`pairpack.train.models.layout_logits`).
        progress: show a progress bar (None: when stderr is a terminal).

    Returns:
        The dataset re-opened, with the two columns.

    Raises:
        ValueError: bad ``reduction``, ``batch_size``, truncation settings or layout.
        ModelError: the model cannot take ``layout`` (:mod:`pairpack.train.models`).
    """
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if layout not in LAYOUTS:
        raise ArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    trunc = _truncation(max_length, truncation, min_completion_tokens)
    if not isinstance(ds, Dataset):
        ds = open_dataset(ds)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    chosen, rejected = _reference_logps(ds, model, trunc, batch_size, device, reduction, layout, max_row_tokens,
                                        attention, progress)
    attrs = {"kind": _CACHE_KIND, "version": _CACHE_VERSION, "model_hash": model_hash(model),
             **_settings(reduction, trunc),
             "dataset_fingerprint": ds.fingerprint, "pairpack_version": __version__,
             "layout": layout}  # informative only: every layout stores the same values
    unit = "nats per token" if reduction == "mean" else "nats per sequence"
    info = {REF_CHOSEN: {"description": f"reference log-prob of the chosen completion ({unit})",
                         "attrs": attrs},
            REF_REJECTED: {"description": f"reference log-prob of the rejected completion ({unit})",
                           "attrs": attrs}}
    add_columns(ds.path, {REF_CHOSEN: chosen, REF_REJECTED: rejected}, info=info)
    return open_dataset(ds.path)


def _reference_logps(ds: Dataset, model: nn.Module, trunc: Truncation, batch_size: int, device: torch.device,
                     reduction: str, layout: str, max_row_tokens: int | None, attention: str,
                     progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`precompute_reference`'s pass over the dataset: float32 ``(N,)`` reference log-probs of
    every pair's chosen and rejected completions, in index order, the model in eval mode under
    ``torch.no_grad`` (its mode restored afterwards)."""
    n = len(ds)
    chosen = np.empty(n, dtype=np.float32)
    rejected = np.empty(n, dtype=np.float32)
    was_training = model.training
    model.eval()
    bar = CountProgress(n, label="pairs", enabled=progress)
    try:
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(lo + batch_size, n), dtype=np.int64)
            if layout == "padded":
                batch = bt.make_plan(ds, idx, truncation=trunc).assemble(ds.pad_id)
            else:
                batch = ds.batch(idx, truncation=trunc, layout=layout, max_row_tokens=max_row_tokens)
            c, r = _batch_logps(model, batch, reduction, device, attention)
            chosen[idx] = c.float().cpu().numpy()
            rejected[idx] = r.float().cpu().numpy()
            bar.update(int(idx[-1]) + 1)
    finally:
        bar.close()
        model.train(was_training)
    return chosen, rejected


def check_reference(
    ds: Dataset,
    *,
    reduction: str,
    model_hash: str | None = None,
    max_length: int | None = None,
    truncation: Truncation | str = "keep_end",
    min_completion_tokens: int = 1,
) -> dict[str, Any]:
    """Check that the dataset's reference cache was made under these settings; return its attrs.

    Call it once before training with the settings of the run (the ``DPO`` module's
    ``reduction``, the loader's ``max_length``/``truncation``, and optionally the reference
    model's :func:`model_hash`).

    Raises:
        StateError: the cache is missing, incomplete, from another dataset, or was made with a
            different reduction, truncation or model; the message names the setting.
    """
    cols = {c.name: c for c in ds.manifest.columns}
    missing = [k for k in REFERENCE_COLUMNS if k not in cols]
    if missing:
        raise StateError(f"{ds.path}: no cached reference log-probs (missing column(s) {missing}); "
                         "run pairpack.reference.precompute_reference first")
    attrs = cols[REF_CHOSEN].attrs
    if cols[REF_REJECTED].attrs != attrs or attrs.get("kind") != _CACHE_KIND:
        raise StateError(f"{ds.path}: columns {list(REFERENCE_COLUMNS)} were not written together by "
                         "precompute_reference; recompute them")
    if attrs.get("version") != _CACHE_VERSION:
        raise StateError(f"{ds.path}: reference cache version {attrs.get('version')!r} is not "
                         f"{_CACHE_VERSION}; recompute it")
    if attrs.get("dataset_fingerprint") != ds.fingerprint:
        raise StateError(f"{ds.path}: reference cache was computed for another dataset (fingerprint "
                         f"{attrs.get('dataset_fingerprint')!r}, this one {ds.fingerprint!r}); recompute it")
    want = _settings(reduction, _truncation(max_length, truncation, min_completion_tokens))
    if model_hash is not None:
        want["model_hash"] = model_hash
    for key, value in want.items():
        if attrs.get(key) != value:
            raise StateError(
                f"{ds.path}: cached reference log-probs were computed with {key}={attrs.get(key)!r}, "
                f"but this run uses {key}={value!r}; recompute them with "
                f"precompute_reference(..., {key}={value!r}) or change the run's setting")
    return dict(attrs)


def reference_columns(
    ds: Dataset,
    *,
    reduction: str,
    model_hash: str | None = None,
    max_length: int | None = None,
    truncation: Truncation | str = "keep_end",
    min_completion_tokens: int = 1,
) -> tuple[Tensor, Tensor]:
    """The whole cache as float32 tensors ``(N,)`` (chosen, rejected), after :func:`check_reference`."""
    check_reference(ds, reduction=reduction, model_hash=model_hash, max_length=max_length,
                    truncation=truncation, min_completion_tokens=min_completion_tokens)
    # copies: the memory maps are read-only and torch wants writable storage
    return (torch.from_numpy(np.array(ds.column(REF_CHOSEN), dtype=np.float32)),
            torch.from_numpy(np.array(ds.column(REF_REJECTED), dtype=np.float32)))


def reference_kwargs(batch: Any) -> dict[str, Tensor]:
    """``{"ref_chosen_logp", "ref_rejected_logp"}`` from a batch's columns, for ``DPO.forward``.

    The batch must have been made with ``columns=REFERENCE_COLUMNS`` (``ds.batch`` or the loader).
    """
    cols = getattr(batch, "columns", {})
    missing = [k for k in REFERENCE_COLUMNS if k not in cols]
    if missing:
        raise StateError(f"batch lacks the cached reference column(s) {missing}; request them with "
                         "columns=pairpack.reference.REFERENCE_COLUMNS")
    return {"ref_chosen_logp": cols[REF_CHOSEN], "ref_rejected_logp": cols[REF_REJECTED]}


def check_loader(loader: Any, dpo: Any, *, model_hash: str | None = None) -> dict[str, Any]:
    """:func:`check_reference` for a training run: the loader's truncation, the DPO's reduction.

    Also checks that ``loader`` delivers the cache columns with each batch and that ``dpo``
    will use them (it holds no reference model, or the cache is ignored silently).

    Args:
        loader: a :class:`pairpack.Loader` (its ``ds``, ``effective_max_length``,
            ``truncation``, ``min_completion_tokens`` and ``columns`` are read).
        dpo: a :class:`pairpack.dpo.DPO` (its ``reduction`` and ``ref_model`` are read).
        model_hash: the reference model's :func:`model_hash`, when it is at hand.

    Raises:
        StateError: a setting differs from the cache's, or the loader omits the columns.
    """
    missing = [k for k in REFERENCE_COLUMNS if k not in tuple(getattr(loader, "columns", ()))]
    if missing:
        raise StateError(f"the loader does not deliver {missing}: create it with "
                         "columns=pairpack.reference.REFERENCE_COLUMNS")
    if getattr(dpo, "ref_model", None) is not None:
        raise StateError("the DPO module holds a reference model, so the cached log-probs would be "
                         "computed again every step; create it with ref_model=False")
    return check_reference(loader.ds, reduction=dpo.reduction, model_hash=model_hash,
                           truncation=loader.effective_truncation)
