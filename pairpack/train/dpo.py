"""DPO loss: per-sequence log-probabilities, the pairwise loss, and a training module.

Shape legend:
    B: preference pairs in a batch (a forward runs on 2B rows: chosen first, then rejected).
    N: padded sequence length (prompt + completion + right padding).
    V: vocabulary size.

Conventions (each is tested in tests/test_dpo.py):
    * Target alignment: ``logits[:, t]`` scores the *target* ``seq[:, t + 1]``. A target is
      scored iff ``completion_mask[:, t + 1]`` is True, so the first completion token is scored
      and no prompt token or pad is. This is ``labels[:, 1:]`` in the DPO reference code and TRL.
    * Reduction: ``"sum"`` (per-sequence sum; the DPO paper, TRL, torchtune) or ``"mean"``
      (per-token mean; x-transformers). ``beta`` is not comparable across the two.
    * Padding is on the right; the model is called without an attention mask, which is only
      correct for a causal model with right padding.
    * Batches of the ``packed`` and ``prefix_shared`` layouts (``PackedBatch``, docs/layouts.md)
      have a scoring map (``batch.score_map()``, derived on the batch's device when first read);
      :func:`sequence_logprobs_from` reads it, and
      :mod:`pairpack.train.models` calls the model with the positions and mask the layout needs.
      The log-probs equal the padded layout's (tests/test_layouts_model.py).

The loss formulas live in :mod:`pairpack.train.losses` (re-exported here).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError, LossConfigError, StateError
from .losses import LOSS_TYPES, DPOOutput, dpo_loss, loss_config
from .models import ATTENTIONS, Attention, as_logits, layout_logits, layout_of

__all__ = [
    "DPO",
    "DPOOutput",
    "LOSS_TYPES",
    "REDUCTIONS",
    "batch_logprobs",
    "dpo_loss",
    "pair_rows",
    "sequence_logprobs",
    "sequence_logprobs_from",
    "wpo_weights",
    "xtransformers_inputs",
]

Reduction = Literal["sum", "mean"]

REDUCTIONS: tuple[str, ...] = ("sum", "mean")
"""How a sequence's token log-probs are reduced: ``"sum"`` (nats per sequence) or ``"mean"`` (per token)."""
_SEQ_MASK_NAMES = ("preferred_seq_mask", "unpreferred_seq_mask")
# pairpack.train.reference.REFERENCE_COLUMNS (reference imports this module)
_REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def _check_bool_mask(name: str, mask: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        # An int 0/1 mask would be inverted bitwise by `~` (0 -> -1), silently wrong.
        raise ArgumentTypeError(f"{name} must be a bool tensor, got {got}; convert with `.bool()`")
    if tuple(mask.shape) != shape:
        raise ArgumentError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")


def _check_pair_inputs(preferred_seq: Tensor, unpreferred_seq: Tensor, prompt_mask: Tensor,
                       preferred_seq_mask: Tensor | None, unpreferred_seq_mask: Tensor | None,
                       ) -> tuple[Tensor, Tensor]:
    """The batch checks shared by :meth:`DPO.forward` and :func:`xtransformers_inputs`: both
    rows ``(B, N)`` with ``N >= 2``, every mask bool ``(B, N)``. Returns the two seq masks, all
    True where None was given."""
    if preferred_seq.ndim != 2 or preferred_seq.shape != unpreferred_seq.shape:
        raise ArgumentError(
            "preferred_seq and unpreferred_seq must both have shape (B, N) (pad them to one "
            f"length), got {tuple(preferred_seq.shape)} and {tuple(unpreferred_seq.shape)}"
        )
    b, n = preferred_seq.shape
    if n < 2:
        raise ArgumentError(f"sequences need N >= 2 tokens to have a target, got N={n}")
    _check_bool_mask("prompt_mask", prompt_mask, (b, n))
    masks = []
    for name, mask in zip(_SEQ_MASK_NAMES, (preferred_seq_mask, unpreferred_seq_mask)):
        if mask is None:
            mask = torch.ones_like(prompt_mask)
        _check_bool_mask(name, mask, (b, n))
        masks.append(mask)
    return masks[0], masks[1]


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def sequence_logprobs(
    logits: Tensor,
    seq: Tensor,
    completion_mask: Tensor,
    *,
    reduction: Reduction = "sum",
) -> Tensor:
    """Log-probability of each row's completion under next-token ``logits``.

    ``logits[:, t]`` predicts ``seq[:, t + 1]``; that target is scored iff
    ``completion_mask[:, t + 1]`` is True. For a row laid out as

        position         0  1  2  3  4
        seq              p0 p1 c0 c1 X        (2 prompt tokens, 2 completion tokens, 1 pad)
        completion_mask  F  F  T  T  F

    the scored terms are ``log p(c0 | p0 p1)`` from ``logits[:, 1]`` and
    ``log p(c1 | p0 p1 c0)`` from ``logits[:, 2]``. ``logits[:, 0]`` (target p1, a prompt
    token) and ``logits[:, 3]`` (target X, a pad) are not scored, and neither is
    ``logits[:, 4]``, which has no target.

    The log-softmax is taken in at least float32 (half precision is upcast). Unscored rows
    are replaced by zeros with ``torch.where`` before the softmax and their terms are
    selected out with ``torch.where`` after it, so NaN or inf at unscored positions cannot
    reach the result or the gradient, and pad ids need not be valid vocabulary ids.

    Args:
        logits: float ``(B, N, V)`` or ``(B, N - 1, V)``, unnormalised next-token scores. With
            length N the last position is ignored (it has no target).
        seq: int ``(B, N)``, token ids.
        completion_mask: bool ``(B, N)``, True on completion tokens that are real (not pad),
            i.e. ``seq_mask & ~prompt_mask``.
        reduction: ``"sum"`` gives the per-sequence sum of log-probs (nats); ``"mean"`` gives
            that sum divided by the number of scored targets (nats per token). A row with no
            scored target gives 0 under either reduction, not NaN.

    Returns:
        ``(B,)`` log-probabilities in nats, dtype ``float32`` or ``float64`` (the wider of
        ``logits.dtype`` and float32). Differentiable with respect to ``logits``.

    Raises:
        ArgumentTypeError (a TypeError): ``completion_mask`` is not bool, or ``seq`` is not an integer tensor.
        ArgumentError (a ValueError): shapes disagree or ``reduction`` is unknown.
    """
    _check_reduction(reduction)
    if seq.ndim != 2:
        raise ArgumentError(f"seq must have shape (B, N), got {tuple(seq.shape)}")
    if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
        raise ArgumentTypeError(f"seq must hold integer token ids, got {seq.dtype}")
    b, n = seq.shape
    _check_bool_mask("completion_mask", completion_mask, (b, n))
    if logits.ndim != 3 or logits.shape[0] != b or logits.shape[1] not in (n, n - 1):
        raise ArgumentError(
            f"logits must have shape (B, N, V) or (B, N - 1, V) with B={b}, N={n}; "
            f"got {tuple(logits.shape)}"
        )
    if not logits.dtype.is_floating_point:
        raise ArgumentTypeError(f"logits must be a floating tensor, got {logits.dtype}")

    logits = logits[:, : n - 1]
    targets = seq[:, 1:]
    scored = completion_mask[:, 1:]

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    safe_logits = torch.where(scored.unsqueeze(-1), logits, 0.0)
    # Pad ids may be out of range (e.g. -100); gather needs a valid index.
    safe_targets = torch.where(scored, targets, 0).long()
    logp = safe_logits.log_softmax(dim=-1, dtype=compute_dtype)
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(scored, token_logp, 0.0)

    total = token_logp.sum(dim=-1)
    if reduction == "sum":
        return total
    count = scored.sum(dim=-1).to(compute_dtype)
    # clamp only changes empty rows (0 / 1 = 0); for count >= 1 this is exactly sum / count.
    return total / count.clamp(min=1.0)


def sequence_logprobs_from(
    batch: Any,
    logits: Tensor,
    *,
    reduction: Reduction = "sum",
    score_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-pair log-probs of the chosen and rejected completions from the logits of a packed or
    prefix-shared batch, through the batch's scoring map.

    One gather takes the ``N`` scored logit vectors (``logits[row, col]`` for each entry of
    ``batch.score_index``), the log-softmax runs over those ``N`` rows only, the label's term is
    picked, and ``index_add`` sums the terms into the ``2B`` (pair, side) slots. No NaN or inf at an
    unscored position can reach the result. Equal to :func:`sequence_logprobs` on the padded
    layout of the same pairs (up to float summation order).

    Args:
        batch: a ``PackedBatch``: ``score_index`` int64 ``(2, N)``, ``score_labels`` int64 ``(N,)``,
            ``score_pair`` int64 ``(N,)`` in ``0..B-1``, ``score_side`` int8 ``(N,)`` (0 chosen,
            1 rejected), ``len(batch) == B``.
        logits: float ``(R, T, V)``, the model's output on ``batch.input_ids``.
        reduction: ``"sum"`` (nats per sequence) or ``"mean"`` (nats per scored token; a
            completion with no scored token gives 0).
        score_index: where the scored logits are, when the rows were rearranged for the model
            (:func:`pairpack.train.models.layout_logits` returns it); default ``batch.score_index``.

    Returns:
        ``(chosen, rejected)``, each float ``(B,)`` in nats, dtype the wider of ``logits.dtype``
        and float32; differentiable with respect to ``logits``.
    """
    _check_reduction(reduction)
    if logits.ndim != 3 or not logits.dtype.is_floating_point:
        raise ArgumentError(f"logits must be a float tensor (R, T, V), got {tuple(logits.shape)} {logits.dtype}")
    index = batch.score_index if score_index is None else score_index
    b = len(batch)
    rows, cols = index.long().unbind(0)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = logits[rows, cols].log_softmax(dim=-1, dtype=compute_dtype)  # (N, V): scored positions only
    token_logp = logp.gather(-1, batch.score_labels.long().unsqueeze(-1)).squeeze(-1)
    slot = batch.score_pair.long() * 2 + batch.score_side.long()  # (pair, side) -> 2b + side
    total = token_logp.new_zeros(2 * b).index_add(0, slot, token_logp)
    if reduction == "mean":
        count = token_logp.new_zeros(2 * b).index_add(0, slot, torch.ones_like(token_logp))
        total = total / count.clamp(min=1.0)
    pairs = total.view(b, 2)
    return pairs[:, 0], pairs[:, 1]


def batch_logprobs(
    model: nn.Module,
    batch: Any,
    *,
    reduction: Reduction = "sum",
    attention: Attention = "auto",
) -> tuple[Tensor, Tensor]:
    """``model``'s log-probs ``(B,)`` of the chosen and of the rejected completions of ``batch``.

    ``batch`` is a padded :class:`~pairpack.batch.triplets.Triplets` (one forward on the ``2B``
    rows, as :meth:`DPO.forward` runs it) or a ``PackedBatch`` (one forward on its rows, called by
    :func:`pairpack.train.models.layout_logits` with the inputs the layout needs). The model's
    output may be logits or an object with ``.logits`` (Hugging Face).

    Raises:
        ModelError: the model cannot take the batch's layout.
        DeviceError: ``attention="flex"`` without CUDA.
    """
    if layout_of(batch) == "padded":
        seq, completion_mask = pair_rows(**batch.as_kwargs())
        logits = as_logits(model(seq[:, :-1]), model)
        logp = sequence_logprobs(logits, seq, completion_mask, reduction=reduction)
        return logp[: len(batch)], logp[len(batch):]
    logits, index = layout_logits(model, batch, attention=attention)
    return sequence_logprobs_from(batch, logits, reduction=reduction, score_index=index)


class DPO(nn.Module):
    """Direct Preference Optimization around a causal language model.

    ``model`` maps int64 ids ``(B, N)`` to logits ``(B, N, V)`` and must be causal. The
    argument contract of :meth:`forward` is that of ``x_transformers.dpo.DPO.forward``, but
    the loss mask is aligned with the targets (see :func:`sequence_logprobs`), so the loss
    differs from x-transformers' released one; :func:`xtransformers_inputs` reconciles them.

    The reference model is frozen: ``requires_grad`` off, always in eval mode (also after
    ``.train()``), run under ``torch.no_grad``. It is registered as a submodule so that
    ``.to(device)`` moves it, but :meth:`parameters` yields the policy's parameters only,
    as x-transformers' does, so ``optimizer(dpo.parameters())`` trains the policy alone.
    ``state_dict()`` holds both, under ``policy_model.`` and ``ref_model.``.
    The policy's train/eval mode is left to the caller; dropout in train mode makes the
    policy differ from the reference even at initialisation.

    Args:
        model: the policy, trained in place.
        beta: inverse temperature, > 0. Under ``reduction="mean"`` (nats per token) and
            ``reduction="sum"`` (nats per sequence) the same value weighs the log-ratio very
            differently, roughly by the completion length; tune it per reduction.
        reduction: ``"mean"`` (default, per-token mean as in x-transformers) or ``"sum"``
            (per-sequence sum as in the DPO paper and TRL).
        loss_type: a name of :data:`pairpack.train.losses.LOSS_TYPES`, or several to train on their
            weighted sum (``("sigmoid", "sft")``); see :mod:`pairpack.train.losses`.
        loss_weights: one weight per loss type (default 1.0 each); see
            :func:`pairpack.train.losses.loss_config`.
        label_smoothing: see :func:`pairpack.train.losses.loss_config`.
        gamma: see :func:`pairpack.train.losses.loss_config`.
        discopop_tau: see :func:`pairpack.train.losses.loss_config`.
        use_weighting: multiply each pair's loss by its WPO weight (:func:`wpo_weights`).
        ref_model: ``None`` (default) takes a deep copy of ``model`` now, before training
            changes it, unless every loss type is reference-free (``simpo``, ``cpo``, ``orpo``,
            ``sft``): then no reference is held and none is ever needed. A module uses that
            module as the reference and freezes it in place. ``False`` holds no reference at
            all: every :meth:`forward` call must then pass ``ref_chosen_logp`` and
            ``ref_rejected_logp`` (computed beforehand with the same reduction), which saves
            the memory and compute of a second model.

        attention: how batches of the ``packed``/``prefix_shared`` layouts reach the model
            (:func:`pairpack.train.models.layout_logits`): ``"auto"`` (default), ``"dense"``,
            ``"split"`` (models that take it, as TinyLM) or ``"flex"`` (CUDA). Padded batches ignore it.

    Raises:
        LossConfigError: invalid ``beta``, ``loss_type``, ``loss_weights``, ``label_smoothing``,
            ``gamma`` or ``discopop_tau``; a reference module given to reference-free losses; WPO
            weighting with a batch-sorted loss type (``aot``, ``aot_unpaired``).
        ArgumentError (a ValueError): invalid ``reduction`` or ``attention``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        reduction: Reduction = "mean",
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        discopop_tau: float = 0.05,
        use_weighting: bool = False,
        ref_model: nn.Module | Literal[False] | None = None,
        attention: Attention = "auto",
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        if attention not in ATTENTIONS:
            raise ArgumentError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.loss = loss_config(beta, loss_type, loss_weights, label_smoothing, gamma, discopop_tau)
        if use_weighting and {"aot", "aot_unpaired"} & set(self.loss.loss_types):
            raise LossConfigError("use_weighting (WPO) cannot be combined with 'aot'/'aot_unpaired': they sort the "
                                  "batch, so a pair's weight would land on another pair's term")
        if ref_model is not None and ref_model is not False and not isinstance(ref_model, nn.Module):
            raise ArgumentTypeError(f"ref_model must be None, False or an nn.Module, got {type(ref_model).__name__}")
        if not self.loss.needs_reference and ref_model is not None:
            raise LossConfigError(f"loss_type {self.loss.loss_types} is reference-free; leave ref_model=None "
                                  "(no reference model and no cached reference log-probs are used)")
        self.policy_model = model
        if ref_model is None and self.loss.needs_reference:
            if not isinstance(model, nn.Module):  # the frozen copy is an nn.Module's
                raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
            ref_model = copy.deepcopy(model)
        if ref_model is None or ref_model is False:
            self.ref_model: nn.Module | None = None
        else:
            ref_model.requires_grad_(False)
            ref_model.eval()
            self.ref_model = ref_model
        self.beta = beta
        self.reduction: Reduction = reduction
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.use_weighting = use_weighting
        self.attention: Attention = attention

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Yield the policy's parameters only (the frozen reference is excluded)."""
        return self.policy_model.parameters(recurse=recurse)

    def train(self, mode: bool = True) -> DPO:
        """Set the policy's mode; the reference stays in eval mode."""
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    def completion_logprobs(self, model: nn.Module, seq: Tensor, completion_mask: Tensor) -> Tensor:
        """Log-probs of ``model``'s completions under this module's reduction.

        Use it to precompute reference log-probs for ``ref_chosen_logp``/``ref_rejected_logp``
        (under ``torch.no_grad()``). The last position is not fed to the model, since its
        logits would have no target; x-transformers likewise calls ``model(seq[:, :-1])``.

        Args:
            model: maps int64 ``(R, N - 1)`` to logits ``(R, N - 1, V)``.
            seq: int64 ``(R, N)``.
            completion_mask: bool ``(R, N)``, ``seq_mask & ~prompt_mask``.

        Returns:
            float ``(R,)`` log-probs in nats (per sequence or per token, see ``reduction``).
        """
        logits = as_logits(model(seq[:, :-1]), model)
        return sequence_logprobs(logits, seq, completion_mask, reduction=self.reduction)

    def forward(
        self,
        preferred_seq: Tensor | Any,
        unpreferred_seq: Tensor | None = None,
        *,
        prompt_mask: Tensor | None = None,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
        ref_chosen_logp: Tensor | None = None,
        ref_rejected_logp: Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """DPO loss of a batch of pairs, right-padded to one length N, or of a batch object.

        Policy and reference each run once, on ``torch.cat([preferred_seq, unpreferred_seq])``.

        ``dpo(batch)`` takes a batch of any layout instead of the tensors: a padded
        :class:`~pairpack.batch.triplets.Triplets` (as ``dpo(**batch.as_kwargs())``) or a
        ``PackedBatch`` (``packed``/``prefix_shared``: the model is called through
        :func:`pairpack.train.models.layout_logits`, one forward on the batch's rows). The losses
        equal the padded layout's. Without a reference model and without ``ref_*_logp``, the
        cached reference columns the batch carries are used (``columns=REFERENCE_COLUMNS``).

        Args:
            preferred_seq: int64 ``(B, N)``, prompt + chosen completion + right padding; or a
                batch object (then ``unpreferred_seq`` and the masks are not passed).
            unpreferred_seq: int64 ``(B, N)``, the same prompt + rejected completion + padding.
            prompt_mask: bool ``(B, N)``, True on prompt tokens; shared by both sequences, so
                the prompt must sit at the same positions in both.
            preferred_seq_mask: bool ``(B, N)``, True on real (non-pad) tokens; None means all
                positions are real.
            unpreferred_seq_mask: bool ``(B, N)``, likewise for ``unpreferred_seq``.
            ref_chosen_logp: float ``(B,)``, precomputed reference log-probs of the chosen
                completions under this module's reduction. Pass both or neither; when passed,
                the reference model is not run.
            ref_rejected_logp: float ``(B,)``, likewise for the rejected completions.
            return_metrics: also return the metrics dict of :func:`dpo_loss`.

        Returns:
            The scalar loss (mean over pairs), or ``(loss, metrics)`` if ``return_metrics``.

        Raises:
            ArgumentError (a ValueError): shapes disagree, N < 2, only one precomputed reference is passed, or
                none is passed while the module holds no reference model.
            ArgumentTypeError (a TypeError): a mask is not bool.
            StateError: a batch object, no reference model, and no cached reference columns.
            ModelError: the model cannot take the batch's layout (:mod:`pairpack.train.models`).
        """
        if not isinstance(preferred_seq, Tensor):
            given = [k for k, v in (("unpreferred_seq", unpreferred_seq), ("prompt_mask", prompt_mask),
                                    ("preferred_seq_mask", preferred_seq_mask),
                                    ("unpreferred_seq_mask", unpreferred_seq_mask)) if v is not None]
            if given:
                raise ArgumentTypeError(f"dpo(batch) takes the batch alone; {given} come from the batch")
            return self._forward_batch(preferred_seq, ref_chosen_logp, ref_rejected_logp, return_metrics)
        if unpreferred_seq is None or prompt_mask is None:
            raise ArgumentTypeError("dpo(preferred_seq, unpreferred_seq, prompt_mask=...) needs all three tensors "
                            "(or pass one batch object: dpo(batch))")
        seq_masks = _check_pair_inputs(preferred_seq, unpreferred_seq, prompt_mask,
                                       preferred_seq_mask, unpreferred_seq_mask)
        b = preferred_seq.shape[0]
        if (ref_chosen_logp is None) != (ref_rejected_logp is None):
            raise ArgumentError("pass both ref_chosen_logp and ref_rejected_logp, or neither")
        self._check_reference_args(ref_chosen_logp)

        seq, completion_mask = pair_rows(preferred_seq, unpreferred_seq, prompt_mask, *seq_masks)

        logits = as_logits(self.policy_model(seq[:, :-1]), self.policy_model)
        policy_logp = sequence_logprobs(logits, seq, completion_mask, reduction=self.reduction)
        policy_chosen, policy_rejected = policy_logp.split(b)
        pair_weights = None
        if self.use_weighting:
            w = wpo_weights(logits, seq, completion_mask)
            pair_weights = w[:b] * w[b:]
        del logits

        ref_chosen = ref_rejected = None
        if ref_chosen_logp is not None:
            ref_chosen, ref_rejected = ref_chosen_logp, ref_rejected_logp
        elif self.loss.needs_reference:
            assert self.ref_model is not None  # checked above
            self.ref_model.eval()  # in case the caller switched it back
            with torch.no_grad():
                ref_logp = self.completion_logprobs(self.ref_model, seq, completion_mask)
            ref_chosen, ref_rejected = ref_logp.split(b)

        tokens = completion_mask[:, 1:].sum(dim=-1)  # scored targets per row (see sequence_logprobs)
        return self._loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, return_metrics,
                          tokens[:b], tokens[b:], pair_weights)

    def _check_reference_args(self, ref_chosen_logp: Tensor | None) -> None:
        if not self.loss.needs_reference and ref_chosen_logp is not None:
            raise LossConfigError(f"loss_type {self.loss.loss_types} is reference-free: do not pass ref_chosen_logp "
                                  "and ref_rejected_logp")
        if self.loss.needs_reference and ref_chosen_logp is None and self.ref_model is None:
            raise ArgumentError(
                "this DPO holds no reference model (ref_model=False); pass ref_chosen_logp and "
                "ref_rejected_logp"
            )

    def _loss(self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None,
              ref_rejected: Tensor | None, return_metrics: bool, chosen_tokens: Tensor, rejected_tokens: Tensor,
              pair_weights: Tensor | None = None) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        loss = self.loss
        out = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=loss.beta,
            loss_type=loss.loss_types,
            loss_weights=loss.loss_weights,
            label_smoothing=loss.label_smoothing,
            gamma=loss.gamma,
            discopop_tau=loss.discopop_tau,
            reduction=self.reduction,
            chosen_tokens=chosen_tokens,
            rejected_tokens=rejected_tokens,
            pair_weights=pair_weights,
        )
        mean_loss = out.losses.mean()
        if return_metrics:
            return mean_loss, out.metrics
        return mean_loss

    def _forward_batch(self, batch: Any, ref_chosen_logp: Tensor | None, ref_rejected_logp: Tensor | None,
                       return_metrics: bool) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward` on a batch object of any layout."""
        if (ref_chosen_logp is None) != (ref_rejected_logp is None):
            raise ArgumentError("pass both ref_chosen_logp and ref_rejected_logp, or neither")
        if ref_chosen_logp is None and self.ref_model is None and self.loss.needs_reference:
            cols = getattr(batch, "columns", {})
            if _REF_COLUMNS[0] not in cols or _REF_COLUMNS[1] not in cols:
                raise StateError(
                    "this DPO holds no reference model (ref_model=False) and the batch carries no cached "
                    f"reference log-probs (columns {list(_REF_COLUMNS)}); make the batches with "
                    "columns=pairpack.reference.REFERENCE_COLUMNS, or pass ref_chosen_logp and ref_rejected_logp")
            ref_chosen_logp, ref_rejected_logp = cols[_REF_COLUMNS[0]], cols[_REF_COLUMNS[1]]
        if layout_of(batch) == "padded":
            return self.forward(**batch.as_kwargs(), ref_chosen_logp=ref_chosen_logp,
                                ref_rejected_logp=ref_rejected_logp, return_metrics=return_metrics)
        if self.use_weighting:
            raise LossConfigError("use_weighting (WPO) is implemented for padded batches only; build the batches "
                                  "with layout='padded'")
        self._check_reference_args(ref_chosen_logp)
        policy_chosen, policy_rejected = batch_logprobs(self.policy_model, batch, reduction=self.reduction,
                                                        attention=self.attention)
        ref_chosen = ref_rejected = None
        if ref_chosen_logp is not None:
            ref_chosen, ref_rejected = ref_chosen_logp, ref_rejected_logp
        elif self.loss.needs_reference:
            assert self.ref_model is not None  # checked above
            self.ref_model.eval()
            with torch.no_grad():
                ref_chosen, ref_rejected = batch_logprobs(self.ref_model, batch, reduction=self.reduction,
                                                          attention=self.attention)
        # scored tokens per (pair, side), from the batch's scoring map (see sequence_logprobs_from)
        slot = batch.score_pair.long() * 2 + batch.score_side.long()
        tokens = torch.bincount(slot, minlength=2 * len(batch)).view(-1, 2)
        return self._loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, return_metrics,
                          tokens[:, 0], tokens[:, 1])


def wpo_weights(logits: Tensor, seq: Tensor, completion_mask: Tensor) -> Tensor:
    """WPO weight of each row (Zhou et al. 2024, arXiv 2406.11827, Eq. 3, as TRL's ``use_weighting``).

    ``exp(mean over scored targets t of [log p(y_t) - log sum_v p(v)^2])``: the policy's
    length-normalised probability of the completion, each token's probability divided by
    ``sum_v p(v)^2``, the chance that two samples from that position agree, so that tokens from
    peaked distributions are not over-weighted. Computed without gradient. A pair's
    weight is the product of its two rows' weights. Not clamped (TRL 1.16 does not clamp either).

    Args:
        logits: float ``(R, N, V)`` or ``(R, N - 1, V)``, as for :func:`sequence_logprobs`.
        seq: int ``(R, N)``.
        completion_mask: bool ``(R, N)``.

    Returns:
        float ``(R,)``, detached; 1.0 for a row with no scored target.
    """
    with torch.no_grad():
        mean_logp = sequence_logprobs(logits, seq, completion_mask, reduction="mean")
        n = seq.shape[1]
        scored = completion_mask[:, 1:]
        lp = logits[:, : n - 1].log_softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        log_sum_sq = torch.where(scored, torch.logsumexp(2 * lp, dim=-1), 0.0)
        return torch.exp(mean_logp - log_sum_sq.sum(dim=-1) / scored.sum(dim=-1).clamp(min=1))


def pair_rows(
    preferred_seq: Tensor,
    unpreferred_seq: Tensor,
    prompt_mask: Tensor,
    preferred_seq_mask: Tensor,
    unpreferred_seq_mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """Both rows of each pair stacked for one model call: ``seq`` int64 ``(2B, N)`` (preferred rows
    first) and its ``completion_mask`` bool ``(2B, N)`` (real tokens that are not prompt), as
    :class:`DPO` feeds them to :func:`sequence_logprobs`."""
    seq = torch.cat([preferred_seq, unpreferred_seq])
    completion_mask = torch.cat([preferred_seq_mask, unpreferred_seq_mask]) & ~torch.cat([prompt_mask, prompt_mask])
    return seq, completion_mask


def xtransformers_inputs(
    preferred_seq: Tensor,
    unpreferred_seq: Tensor,
    prompt_mask: Tensor,
    preferred_seq_mask: Tensor | None = None,
    unpreferred_seq_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Keyword arguments for ``x_transformers.dpo.DPO.forward`` that score the right targets.

    x-transformers (2.x) computes ``lp[:, i] = log p(seq[:, i + 1] | seq[:, :i + 1])`` for
    i in 0..N-2, and before its masked mean it trims a loss mask of length N to
    ``mask[:, :-1]``. That lines the mask up with the *inputs*, not the targets: it drops
    the first completion token and scores the first pad. It trims only when the mask is
    exactly one longer than ``lp``; a mask of length N - 1 is used as given.

    So this returns the masks shifted onto the targets, ``mask[:, 1:]`` of shape
    ``(B, N - 1)``: ``prompt_mask[:, 1:]`` and both seq masks ``[:, 1:]`` (all True when
    None). x-transformers then forms ``~prompt_mask[:, 1:] & seq_mask[:, 1:]``, which is
    exactly pairpack's scored-target mask ``completion_mask[:, 1:]``, and its loss equals
    ``DPO(model, reduction="mean")`` on the original inputs. The seq masks are always
    passed explicitly: if they were derived from x-transformers' ``pad_id`` they would have
    length N and could not be combined with a prompt mask of length N - 1. The sequences
    are passed unchanged.

    Args:
        preferred_seq: int64 ``(B, N)``.
        unpreferred_seq: int64 ``(B, N)``.
        prompt_mask: bool ``(B, N)``, True on prompt tokens.
        preferred_seq_mask: bool ``(B, N)`` or None (all real tokens).
        unpreferred_seq_mask: bool ``(B, N)`` or None.

    Returns:
        ``{"preferred_seq", "unpreferred_seq"}`` (``(B, N)``, unchanged) and
        ``{"prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask"}`` (bool ``(B, N - 1)``),
        to be splatted: ``xt_dpo(**xtransformers_inputs(...))``.

    Raises:
        ArgumentError (a ValueError): shapes disagree or N < 2.
        ArgumentTypeError (a TypeError): a mask is not bool.
    """
    masks = _check_pair_inputs(preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask)
    return {
        "preferred_seq": preferred_seq,
        "unpreferred_seq": unpreferred_seq,
        "prompt_mask": prompt_mask[:, 1:],
        **{name: mask[:, 1:] for name, mask in zip(_SEQ_MASK_NAMES, masks)},
    }
