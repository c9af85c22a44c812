"""Preference losses: the DPO family, its reference-free relatives, weighted mixes of them.

Everything here works on per-sequence log-probabilities; how they are computed from a model
(target alignment, masks, reduction) is :mod:`pairpack.dpo`'s business.

Notation (all per pair, shape ``(B,)``): ``x_c``, ``x_r`` the policy log-probs of the chosen and
rejected completions under the caller's reduction (sum: nats per sequence; mean: nats per
token), ``p_c``, ``p_r`` the reference's, ``L_c``, ``L_r`` the numbers of scored tokens,
``a = x / L`` the per-token average (``a = x`` when the inputs already are means),
``dc = x_c - p_c``, ``dr = x_r - p_r``, ``h = dc - dr``, ``b = beta``, ``e = label_smoothing``,
``s = sigmoid``, ``ls = logsigmoid``, ``cdpo(z) = -(1 - e) ls(z) - e ls(-z)``.

| loss type | per-pair loss | at policy = reference |
|---|---|---|
| sigmoid | ``cdpo(b h)`` | ``ln 2`` |
| robust | ``(-(1-e) ls(b h) + e ls(-b h)) / (1 - 2e)`` | ``ln 2`` |
| hinge | ``relu(1 - b h)`` | ``1`` |
| ipo | ``(h - 1/(2b))^2`` | ``1/(4b^2)`` |
| exo_pair | ``s(bh)(ls(bh) - ln(1-e)) + s(-bh)(ls(-bh) - ln e)``, ``e > 0`` | ``-ln 2 - ½ ln(e(1-e))`` |
| nca_pair | ``-ls(b dc) - ½ ls(-b dc) - ½ ls(-b dr)`` | ``2 ln 2`` |
| bco_pair | ``-ls(b dc) - ls(-b dr)`` | ``2 ln 2`` |
| sppo_hard | ``(dc - 1/(2b))^2 + (dr + 1/(2b))^2`` | ``1/(2b^2)`` |
| aot | ``cdpo(b (sort(x_c - x_r) - sort(p_c - p_r)))`` over the batch | ``ln 2`` |
| aot_unpaired | ``cdpo(b (sort(dc) - sort(dr)))`` over the batch | ``ln 2`` |
| apo_zero | ``1 - s(b dc) + s(b dr)`` | ``1`` |
| apo_down | ``s(b dc) + 1 - s(b h)`` | ``1`` |
| discopop | ``(1 - s(b h / tau)) (-ls(b h)) + s(b h / tau) exp(-b h)`` | ``(1 + ln 2) / 2`` |
| sigmoid_norm | ``-ls(b (dc / L_c - dr / L_r))`` | ``ln 2`` |
| sft | ``-a_c`` | (no constant) |
| simpo | ``cdpo(b (a_c - a_r) - gamma)``  (no reference) | (no reference) |
| cpo | ``cdpo(b (x_c - x_r)) - a_c``  (no reference) | (no reference) |
| orpo | ``-a_c - b ls(lo(a_c) - lo(a_r))``, ``lo(a) = a - ln(1 - e^a)`` | (no reference) |

The loss table of docs/dpo.md gives each one's paper and every convention that differs from TRL.
This module depends on torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError, LossConfigError

__all__ = [
    "BATCH_SORTED_LOSS_TYPES",
    "DPOOutput",
    "LOSS_TYPES",
    "LossConfig",
    "REFERENCE_FREE_LOSS_TYPES",
    "dpo_loss",
    "loss_config",
]

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "cpo", "orpo",
)
"""Every loss type, under TRL's names (formulas: the module docstring)."""
REFERENCE_FREE_LOSS_TYPES: frozenset[str] = frozenset({"sft", "simpo", "cpo", "orpo"})
"""Loss types that read no reference log-probs: a run made only of these needs no reference model."""
BATCH_SORTED_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})
"""Loss types that pair the batch's sorted values, not each pair with itself: per-pair weights would
land on the wrong pair, and the loss depends on which pairs share a (per-rank) batch."""
# Loss types whose formula has a label-smoothing term; a nonzero epsilon needs at least one.
_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
# Loss types that read per-token averages, hence the token counts under reduction="sum".
_PER_TOKEN = frozenset({"sigmoid_norm", "sft", "simpo", "cpo", "orpo"})
Reduction = Literal["sum", "mean"]


class LossConfig(NamedTuple):
    """A checked loss configuration (see :func:`loss_config`)."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    gamma: float
    discopop_tau: float

    @property
    def needs_reference(self) -> bool:
        """Whether any loss type reads reference log-probs."""
        return not set(self.loss_types) <= REFERENCE_FREE_LOSS_TYPES

    @property
    def needs_token_counts(self) -> bool:
        """Whether any loss type reads per-token averages (so summed inputs need their counts)."""
        return bool(_PER_TOKEN & set(self.loss_types))


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def loss_config(
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    discopop_tau: float = 0.05,
) -> LossConfig:
    """Check a loss configuration and normalise it (one loss type -> a 1-tuple, weights 1.0).

    Args:
        beta: inverse temperature, finite and > 0 (for ``orpo`` the weight of the odds-ratio term,
            TRL's ``beta`` there).
        loss_type: one name of :data:`LOSS_TYPES`, or several (distinct) to train on their
            weighted sum.
        loss_weights: one finite weight >= 0 per loss type, summing to > 0; None means 1.0 each.
            The per-pair loss is ``sum_k w_k * loss_k`` (TRL's ``loss_weights``; not normalised).
        label_smoothing: ``e`` in ``[0, 0.5)``; only loss types with an ``e`` term accept a nonzero
            value, and ``exo_pair`` needs ``e > 0`` (its paper suggests 1e-3).
        gamma: SimPO's target margin, finite and >= 0, in the units of ``beta * a`` (TRL's
            ``simpo_gamma``; TRL subtracts ``simpo_gamma / beta`` before multiplying by beta).
        discopop_tau: DiscoPOP's temperature, finite and > 0.

    Raises:
        LossConfigError: any of the above is violated; the message names the argument and the fix.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise LossConfigError(f"loss_type is empty; pass one or more of {LOSS_TYPES}")
    for t in types:
        if t not in LOSS_TYPES:
            raise LossConfigError(f"loss_type must be one of {LOSS_TYPES}, got {t!r}")
    if len(set(types)) != len(types):
        raise LossConfigError(f"loss_type {types} names a loss type twice; give it one weight instead")
    # `not beta > 0` also rejects NaN.
    if not (_number(beta) and beta > 0 and math.isfinite(beta)):
        raise LossConfigError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(loss_weights)
        if len(weights) != len(types):
            raise LossConfigError(
                f"loss_weights has {len(weights)} value(s) for {len(types)} loss type(s) {types}; give one each")
        if not all(_number(w) and math.isfinite(w) and w >= 0 for w in weights):
            raise LossConfigError(
                f"loss_weights must be finite numbers >= 0 (a negative weight maximises an unbounded loss), "
                f"got {weights}")
        if not sum(weights) > 0:
            raise LossConfigError(f"loss_weights must sum to a positive number, got {weights}")
        weights = tuple(float(w) for w in weights)
    if not (_number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        # At 0.5 the sigmoid loss is constant and the robust loss divides by zero.
        raise LossConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing != 0.0 and not set(types) & set(_SMOOTHED):
        raise LossConfigError(
            f"label_smoothing={label_smoothing!r} has no effect with loss_type={types[0] if len(types) == 1 else types!r}; "
            f"it applies only to {_SMOOTHED}; pass label_smoothing=0.0"
        )
    if "exo_pair" in types and label_smoothing == 0.0:
        raise LossConfigError("loss_type 'exo_pair' needs label_smoothing > 0 (its log(e) term is infinite at 0); "
                              "the EXO paper suggests label_smoothing=1e-3")
    if not (_number(gamma) and gamma >= 0 and math.isfinite(gamma)):
        raise LossConfigError(f"gamma (SimPO's margin) must be a finite number >= 0, got {gamma!r}")
    if not (_number(discopop_tau) and discopop_tau > 0 and math.isfinite(discopop_tau)):
        raise LossConfigError(f"discopop_tau must be a finite number > 0, got {discopop_tau!r}")
    return LossConfig(types, weights, float(beta), float(label_smoothing), float(gamma), float(discopop_tau))


class DPOOutput(NamedTuple):
    """Result of :func:`dpo_loss`.

    Attributes:
        losses: float ``(B,)``, per-pair loss ``sum_k w_k loss_k`` (times the pair weights when
            given); differentiable. Reduce it yourself (``.mean()``). For ``aot``/``aot_unpaired``
            entry ``i`` belongs to the i-th smallest log-ratios, not to pair ``i``.
        chosen_rewards: float ``(B,)``, ``beta * (policy_chosen - ref_chosen)``, detached; without
            reference log-probs (reference-free losses) ``beta * policy_chosen``, as TRL's CPO/ORPO.
        rejected_rewards: float ``(B,)``, likewise for the rejected completions.
        metrics: 0-dim detached tensors, each a mean over pairs: ``"rewards/chosen"``,
            ``"rewards/rejected"``, ``"rewards/margins"`` (chosen minus rejected reward),
            ``"rewards/accuracies"`` (fraction with chosen reward strictly greater, so 0 when
            policy equals reference), ``"logps/chosen"``, ``"logps/rejected"`` (policy
            log-probs in whatever reduction they were computed with); with several loss types
            also ``"loss/<type>"`` (unweighted), and ``"weights/mean"`` with pair weights.
            Tensors rather than floats so that no device sync happens until the caller logs them.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]


def _cdpo(z: Tensor, eps: float) -> Tensor:
    # eps = 0 gives exactly -logsigmoid(z): 0 * finite is 0.
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log_odds(avg_logp: Tensor) -> Tensor:
    """``log(P / (1 - P))`` with ``P = exp(avg_logp)``; ``avg_logp`` is clamped just below 0 so that a
    completion of probability 1 gives a large finite value rather than inf."""
    a = avg_logp.clamp(max=-torch.finfo(avg_logp.dtype).tiny)
    return a - torch.log(-torch.expm1(a))


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    discopop_tau: float = 0.05,
    reduction: Reduction = "sum",
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> DPOOutput:
    """Per-pair preference loss from sequence log-probabilities (formulas: the module docstring).

    Args:
        policy_chosen: float ``(B,)``, policy log-prob of each chosen completion (nats).
        policy_rejected: float ``(B,)``, policy log-prob of each rejected completion.
        ref_chosen: float ``(B,)``, reference log-prob of each chosen completion; may be None
            (with ``ref_rejected``) when every loss type is reference-free.
        ref_rejected: float ``(B,)``, likewise for the rejected completions.
        beta: see :func:`loss_config` (as are the next five).
        loss_type: one loss type or several.
        loss_weights: one weight per loss type.
        label_smoothing: ``e`` of the smoothed types.
        gamma: SimPO's margin.
        discopop_tau: DiscoPOP's temperature.
        reduction: what the log-probs are: ``"sum"`` (nats per sequence) or ``"mean"`` (nats per
            token). The DPO-family losses use them as given; the per-token ones (``sigmoid_norm``,
            ``sft``, ``simpo``, ``cpo``'s NLL, ``orpo``) divide sums by the token counts.
        chosen_tokens: ``(B,)`` scored tokens of each chosen completion (>= 1); needed under
            ``reduction="sum"`` by the per-token loss types.
        rejected_tokens: ``(B,)``, likewise for the rejected completions.
        pair_weights: optional float ``(B,)`` multiplying each pair's loss (WPO weights,
            :func:`pairpack.dpo.wpo_weights`); used as given, so pass them detached.

    Returns:
        :class:`DPOOutput`.

    Raises:
        LossConfigError: a bad configuration (:func:`loss_config`), missing reference log-probs or
            token counts that the loss types need, pair weights with a batch-sorted loss type.
        ArgumentError (a ValueError): inputs that are not ``(B,)`` tensors of one shape.
    """
    cfg = loss_config(beta, loss_type, loss_weights, label_smoothing, gamma, discopop_tau)
    counts_needed = _check_inputs(cfg, reduction, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                  chosen_tokens, rejected_tokens, pair_weights)
    xc, xr = policy_chosen, policy_rejected
    pc = ref_chosen if ref_chosen is not None else torch.zeros_like(xc)
    pr = ref_rejected if ref_rejected is not None else torch.zeros_like(xr)
    if counts_needed:
        lc = chosen_tokens.to(xc.dtype).clamp(min=1.0)  # type: ignore[union-attr]
        lr = rejected_tokens.to(xr.dtype).clamp(min=1.0)  # type: ignore[union-attr]
    else:
        lc = lr = torch.ones((), dtype=xc.dtype, device=xc.device)
    logps = _LogProbs(xc, xr, pc, pr, lc, lr)
    terms = {t: _loss_term(t, cfg, logps) for t in cfg.loss_types}
    losses = sum(w * terms[t] for t, w in zip(cfg.loss_types, cfg.loss_weights))
    assert isinstance(losses, Tensor)
    if pair_weights is not None:
        losses = losses * pair_weights

    chosen_rewards = (cfg.beta * logps.dc).detach()
    rejected_rewards = (cfg.beta * logps.dr).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    if len(terms) > 1:
        metrics.update({f"loss/{t}": v.detach().mean() for t, v in terms.items()})
    if pair_weights is not None:
        metrics["weights/mean"] = pair_weights.detach().mean()
    return DPOOutput(losses, chosen_rewards, rejected_rewards, metrics)


def _check_inputs(
    cfg: LossConfig,
    reduction: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_tokens: Tensor | None,
    rejected_tokens: Tensor | None,
    pair_weights: Tensor | None,
) -> bool:
    """:func:`dpo_loss`'s checks of its inputs against the configuration, in the order its
    docstring's Raises lists them; returns whether the token counts are needed (per-token loss
    types under ``reduction="sum"``)."""
    if reduction not in ("sum", "mean"):
        raise LossConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if (ref_chosen is None) != (ref_rejected is None):
        raise LossConfigError("pass both ref_chosen and ref_rejected, or neither")
    has_ref = ref_chosen is not None
    if cfg.needs_reference and not has_ref:
        need = [t for t in cfg.loss_types if t not in REFERENCE_FREE_LOSS_TYPES]
        raise LossConfigError(f"loss type(s) {need} need reference log-probs; pass ref_chosen and ref_rejected "
                              f"(only {sorted(REFERENCE_FREE_LOSS_TYPES)} train without a reference)")
    inputs = [policy_chosen, policy_rejected] + ([ref_chosen, ref_rejected] if has_ref else [])
    counts_needed = cfg.needs_token_counts and reduction == "sum"
    if counts_needed:
        if chosen_tokens is None or rejected_tokens is None:
            need = [t for t in cfg.loss_types if t in _PER_TOKEN]
            raise LossConfigError(f"loss type(s) {need} average over tokens: with reduction='sum' pass chosen_tokens "
                                  "and rejected_tokens (the scored-token counts)")
        inputs += [chosen_tokens, rejected_tokens]
    if pair_weights is not None:
        inputs.append(pair_weights)
        sorted_types = BATCH_SORTED_LOSS_TYPES & set(cfg.loss_types)
        if sorted_types:
            raise LossConfigError(f"pair weights (WPO) cannot be used with {sorted(sorted_types)}: those losses sort "
                                  "the batch, so a pair's weight would land on another pair's term")
    shapes = {tuple(t.shape) for t in inputs}  # type: ignore[union-attr]
    if len(shapes) != 1 or policy_chosen.ndim != 1:
        raise ArgumentError(f"the log-probs (and token counts, pair weights) must all have shape (B,), "
                         f"got {[tuple(t.shape) for t in inputs]}")  # type: ignore[union-attr]
    return counts_needed


class _LogProbs(NamedTuple):
    """The per-pair quantities every loss type reads, float ``(B,)`` each (the module docstring's
    notation): policy ``xc``, ``xr``; reference ``pc``, ``pr`` (zeros without a reference);
    scored-token counts ``lc``, ``lr`` (a 0-dim 1 when the log-probs are already per token)."""

    xc: Tensor
    xr: Tensor
    pc: Tensor
    pr: Tensor
    lc: Tensor
    lr: Tensor

    @property
    def dc(self) -> Tensor:
        return self.xc - self.pc

    @property
    def dr(self) -> Tensor:
        return self.xr - self.pr


def _loss_term(t: str, cfg: LossConfig, v: _LogProbs) -> Tensor:
    """The per-pair loss ``(B,)`` of loss type ``t`` (the module docstring's table), unweighted."""
    b, eps = cfg.beta, cfg.label_smoothing
    xc, xr, pc, pr, lc, lr = v
    dc, dr = v.dc, v.dr
    h = dc - dr
    if t == "sigmoid":
        return _cdpo(b * h, eps)
    if t == "robust":
        return (-(1 - eps) * F.logsigmoid(b * h) + eps * F.logsigmoid(-b * h)) / (1 - 2 * eps)
    if t == "hinge":
        return F.relu(1 - b * h)
    if t == "ipo":
        return (h - 1 / (2 * b)) ** 2
    if t == "exo_pair":
        z = b * h
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if t == "nca_pair":
        return -F.logsigmoid(b * dc) - 0.5 * F.logsigmoid(-b * dc) - 0.5 * F.logsigmoid(-b * dr)
    if t == "bco_pair":
        return -F.logsigmoid(b * dc) - F.logsigmoid(-b * dr)
    if t == "sppo_hard":
        return (dc - 0.5 / b) ** 2 + (dr + 0.5 / b) ** 2
    if t == "aot":
        return _cdpo(b * (torch.sort(xc - xr).values - torch.sort(pc - pr).values), eps)
    if t == "aot_unpaired":
        return _cdpo(b * (torch.sort(dc).values - torch.sort(dr).values), eps)
    if t == "apo_zero":
        return 1 - torch.sigmoid(b * dc) + torch.sigmoid(b * dr)
    if t == "apo_down":
        return torch.sigmoid(b * dc) + 1 - torch.sigmoid(b * h)
    if t == "discopop":
        z = b * h
        mix = torch.sigmoid(z / cfg.discopop_tau)
        return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
    if t == "sigmoid_norm":
        return -F.logsigmoid(b * (dc / lc - dr / lr))
    if t == "sft":
        return -xc / lc
    if t == "simpo":
        return _cdpo(b * (xc / lc - xr / lr) - cfg.gamma, eps)
    if t == "cpo":
        return _cdpo(b * (xc - xr), eps) - xc / lc
    # "orpo"
    return -xc / lc - b * F.logsigmoid(_log_odds(xc / lc) - _log_odds(xr / lr))
