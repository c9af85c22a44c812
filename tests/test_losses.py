"""Tests for pairpack.train.losses: every loss type against hand-computed values, its constant at
policy = reference, weighted mixes, reference-free training, WPO weights, and argument errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from pairpack.dpo import DPO, sequence_logprobs, wpo_weights
from pairpack.errors import LossConfigError, PairpackError
from pairpack.train.losses import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, dpo_loss, loss_config
from pairpack.train.tinylm import TinyLM
from tests import layout_ref
from tests.test_dpo import FAST, VOCAB, TinyCausalLM, make_batch, perturbed

# The vector of ../shared/notes/dpo.md §2.3 (float64): h = [1.5, -1.0], dc = [1, -0.5], dr = [-0.5, 0.5].
VEC = {
    "policy_chosen": torch.tensor([-10.0, -20.5], dtype=torch.float64),
    "policy_rejected": torch.tensor([-12.0, -19.0], dtype=torch.float64),
    "ref_chosen": torch.tensor([-11.0, -20.0], dtype=torch.float64),
    "ref_rejected": torch.tensor([-11.5, -19.5], dtype=torch.float64),
}
COUNTS = {"chosen_tokens": torch.tensor([4, 6]), "rejected_tokens": torch.tensor([5, 3])}

# Computed by hand from each paper's formula (plain float math, beta 0.1; label smoothing 0 unless
# named), independently of the module. In the order of pairs 0 and 1 of VEC.
HAND = [
    ("nca_pair", {}, [1.3508248, 1.4119193]),
    ("bco_pair", {}, [1.3128563, 1.4369193]),
    ("sppo_hard", {}, [36.25, 60.5]),
    ("apo_zero", {}, [0.9625234, 1.0249948]),
    ("apo_down", {}, [0.9875493, 1.0124818]),
    ("discopop", {}, [0.8493376, 0.7874020]),
    ("exo_pair", {"label_smoothing": 1e-3}, [2.5055166, 2.9350043]),
    ("sigmoid_norm", {}, [0.6758003, 0.7057253]),
    ("sft", {}, [2.5, 3.4166667]),
    ("simpo", {}, [0.9803133, 0.8027294]),  # gamma 0.5
    ("simpo", {"label_smoothing": 0.1}, [0.9293133, 0.7818961]),
    ("cpo", {}, [3.0981389, 4.1876237]),
    ("orpo", {}, [2.5749369, 3.4217769]),
    # sorted within the batch: policy log-ratios [-1.5, 2.0] vs reference [-0.5, 0.5]
    ("aot", {}, [0.7443967, 0.6209570]),
    # sorted dc [-0.5, 1.0] vs sorted dr [-0.5, 0.5]
    ("aot_unpaired", {}, [0.6931472, 0.6684596]),
]


@pytest.mark.parametrize(("loss_type", "kw", "expected"), HAND, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(HAND)])
def test_hand_computed_losses(loss_type, kw, expected):
    out = dpo_loss(**VEC, **COUNTS, beta=0.1, loss_type=loss_type, reduction="sum", **kw)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=5e-7)


def test_every_loss_type_has_a_hand_vector():
    covered = {t for t, _, _ in HAND} | {"sigmoid", "robust", "hinge", "ipo"}  # the last four: test_dpo.py
    assert covered == set(LOSS_TYPES)


def test_trl_length_normalised_ipo_is_ipo_on_per_token_means():
    """TRL's IPO divides each log-ratio by its completion length; pairpack's IPO takes the inputs as
    given, so it equals TRL's exactly when fed per-token means (reduction="mean")."""
    lc, lr = COUNTS["chosen_tokens"].double(), COUNTS["rejected_tokens"].double()
    means = {k: v / (lc if "chosen" in k else lr) for k, v in VEC.items()}
    out = dpo_loss(**means, beta=0.1, loss_type="ipo", reduction="mean")
    torch.testing.assert_close(out.losses, torch.tensor([21.6225, 27.5625], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "sft", "simpo", "cpo", "orpo"])
def test_per_token_losses_read_means_directly(loss_type):
    """Summed inputs with counts and per-token means without counts give the same per-token
    losses, except cpo's preference term, which follows the reduction like sigmoid."""
    lc, lr = COUNTS["chosen_tokens"].double(), COUNTS["rejected_tokens"].double()
    means = {k: v / (lc if "chosen" in k else lr) for k, v in VEC.items()}
    summed = dpo_loss(**VEC, **COUNTS, loss_type=loss_type, reduction="sum").losses
    averaged = dpo_loss(**means, loss_type=loss_type, reduction="mean").losses
    if loss_type == "cpo":  # subtract the preference term -logsigmoid(beta (x_c - x_r)) of each
        for x, name in ((VEC, "summed"), (means, "averaged")):
            pref = -torch.nn.functional.logsigmoid(0.1 * (x["policy_chosen"] - x["policy_rejected"]))
            if name == "summed":
                summed = summed - pref
            else:
                averaged = averaged - pref
    torch.testing.assert_close(summed, averaged, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# invariants: the constant at policy = reference, symmetry, batch sorting

def _constant(loss_type: str, beta: float, eps: float) -> float | None:
    ln2 = math.log(2)
    return {
        "sigmoid": ln2, "robust": ln2, "hinge": 1.0, "ipo": 1 / (4 * beta**2),
        "exo_pair": -ln2 - 0.5 * math.log(eps * (1 - eps)) if eps else None,
        "nca_pair": 2 * ln2, "bco_pair": 2 * ln2, "sppo_hard": 1 / (2 * beta**2), "aot": ln2,
        "aot_unpaired": ln2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": (1 + ln2) / 2, "sigmoid_norm": ln2,
    }.get(loss_type)


REF_BASED = [t for t in LOSS_TYPES if t not in REFERENCE_FREE_LOSS_TYPES and t != "sft"]


@FAST
@given(logp=st.lists(st.floats(-200, -0.01), min_size=2, max_size=8), beta=st.sampled_from([0.01, 0.1, 0.5, 2.0]),
       loss_type=st.sampled_from(REF_BASED), data=st.data())
@example(logp=[-1.0, -2.0], beta=0.1, loss_type="discopop", data=None)
def test_policy_equals_reference_gives_the_known_constant(logp, beta, loss_type, data):
    b = len(logp) // 2
    x = torch.tensor(logp[: 2 * b], dtype=torch.float64)
    xc, xr = x[:b], x[b:]
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    counts = torch.arange(1, b + 1)
    out = dpo_loss(xc, xr, xc.clone(), xr.clone(), beta=beta, loss_type=loss_type, label_smoothing=eps,
                   chosen_tokens=counts, rejected_tokens=counts.flip(0))
    expected = _constant(loss_type, beta, eps)
    torch.testing.assert_close(out.losses, torch.full((b,), expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert out.metrics["rewards/accuracies"].item() == 0.0


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss_type", REF_BASED)
def test_policy_equals_reference_through_the_module(loss_type, reduction):
    model = TinyCausalLM(seed=1)
    pref, unpref, pm, pmask, umask = make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1])], extra_pad=1)
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    dpo = DPO(model, beta=0.3, reduction=reduction, loss_type=loss_type, label_smoothing=eps)
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert loss.item() == pytest.approx(_constant(loss_type, 0.3, eps), rel=1e-12)


def test_reference_free_constants():
    """Equal chosen and rejected average log-probs: simpo = softplus(gamma), cpo = ln 2 + NLL,
    orpo = NLL + beta ln 2; sft is the chosen per-token NLL."""
    x = torch.tensor([-3.0, -0.5], dtype=torch.float64)
    n = torch.tensor([3, 2])
    kw = dict(chosen_tokens=n, rejected_tokens=n, beta=0.2)
    nll = -x / n
    torch.testing.assert_close(dpo_loss(x, x, loss_type="simpo", gamma=0.7, **kw).losses,
                               torch.full((2,), math.log1p(math.exp(0.7)), dtype=torch.float64))
    torch.testing.assert_close(dpo_loss(x, x, loss_type="cpo", **kw).losses, math.log(2) + nll)
    torch.testing.assert_close(dpo_loss(x, x, loss_type="orpo", **kw).losses, nll + 0.2 * math.log(2))
    torch.testing.assert_close(dpo_loss(x, x.flip(0), loss_type="sft", **kw).losses, nll)


def test_orpo_survives_a_certain_completion():
    """Average log-prob 0 (probability 1) has infinite odds; the loss stays finite."""
    out = dpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), loss_type="orpo", reduction="mean")
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_sorted_losses_are_permutation_invariant_but_batch_dependent(loss_type):
    """aot losses pair the i-th smallest values of the batch: permuting the pairs permutes nothing
    in the loss vector, and, unlike sigmoid, the loss of a batch is not the mean of the losses of
    its halves: under data parallelism each rank sorts only its own pairs."""
    g = torch.Generator().manual_seed(0)
    xc, xr, pc, pr = (torch.randn(8, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    full = dpo_loss(xc, xr, pc, pr, loss_type=loss_type, beta=0.5).losses
    perm = torch.randperm(8, generator=g)
    permuted = dpo_loss(xc[perm], xr[perm], pc[perm], pr[perm], loss_type=loss_type, beta=0.5).losses
    torch.testing.assert_close(full, permuted, rtol=0, atol=0)
    halves = [dpo_loss(xc[s], xr[s], pc[s], pr[s], loss_type=loss_type, beta=0.5).losses.mean()
              for s in (slice(0, 4), slice(4, 8))]
    assert abs(full.mean().item() - (sum(halves) / 2).item()) > 1e-3
    sig_halves = [dpo_loss(xc[s], xr[s], pc[s], pr[s], beta=0.5).losses.mean() for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(dpo_loss(xc, xr, pc, pr, beta=0.5).losses.mean(), sum(sig_halves) / 2)


# ---------------------------------------------------------------------------------------------
# mixes


def test_weighted_mix_is_the_weighted_sum():
    mix = dpo_loss(**VEC, **COUNTS, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5))
    sig = dpo_loss(**VEC, loss_type="sigmoid").losses
    sft = dpo_loss(**VEC, **COUNTS, loss_type="sft").losses
    torch.testing.assert_close(mix.losses, sig + 0.5 * sft, rtol=0, atol=0)
    torch.testing.assert_close(mix.metrics["loss/sigmoid"], sig.mean())
    torch.testing.assert_close(mix.metrics["loss/sft"], sft.mean())
    unweighted = dpo_loss(**VEC, **COUNTS, loss_type=["sigmoid", "sft"]).losses
    torch.testing.assert_close(unweighted, sig + sft, rtol=0, atol=0)


def test_mix_through_the_module_trains_both_terms():
    policy, ref = TinyCausalLM(seed=4), perturbed(TinyCausalLM(seed=4), seed=5)
    batch = make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1])])
    kwargs = dict(prompt_mask=batch[2], preferred_seq_mask=batch[3], unpreferred_seq_mask=batch[4])
    losses = {}
    for types, weights in ((("sigmoid",), None), (("sft",), None), (("sigmoid", "sft"), (1.0, 0.5))):
        dpo = DPO(policy, reduction="sum", loss_type=types, loss_weights=weights,
                  ref_model=ref if "sigmoid" in types else None)
        losses[types] = dpo(batch[0], batch[1], **kwargs)
    torch.testing.assert_close(losses[("sigmoid", "sft")], losses[("sigmoid",)] + 0.5 * losses[("sft",)])


# ---------------------------------------------------------------------------------------------
# reference-free training


@pytest.mark.parametrize("loss_type", sorted(REFERENCE_FREE_LOSS_TYPES))
def test_reference_free_needs_no_reference(loss_type):
    policy = TinyCausalLM(seed=6)
    dpo = DPO(policy, reduction="sum", loss_type=loss_type, beta=0.5)
    assert dpo.ref_model is None
    assert sorted(dpo.state_dict()) == sorted(f"policy_model.{k}" for k in policy.state_dict())
    pref, unpref, pm, pmask, umask = make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1])], extra_pad=2)
    loss, metrics = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                        return_metrics=True)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())
    # by hand: summed policy log-probs and the scored-token counts of each row
    with torch.no_grad():
        seq = torch.cat([pref, unpref])
        cm = torch.cat([pmask, umask]) & ~torch.cat([pm, pm])
        lp = sequence_logprobs(policy(seq), seq, cm, reduction="sum")
    expected = dpo_loss(lp[:2], lp[2:], loss_type=loss_type, beta=0.5, chosen_tokens=torch.tensor([2, 3]),
                        rejected_tokens=torch.tensor([1, 2])).losses.mean()
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(metrics["rewards/chosen"], 0.5 * lp[:2].mean())


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid_norm", "orpo"])
def test_length_normalised_losses_ignore_the_reduction(loss_type):
    """These read per-token averages: the module's token counts make sum and mean agree."""
    policy, ref = TinyCausalLM(seed=7), perturbed(TinyCausalLM(seed=7), seed=8)
    batch = make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1, 2, 3])], extra_pad=1)
    kwargs = dict(prompt_mask=batch[2], preferred_seq_mask=batch[3], unpreferred_seq_mask=batch[4])
    r = ref if loss_type == "sigmoid_norm" else None
    out = [DPO(policy, reduction=red, loss_type=loss_type, ref_model=r)(batch[0], batch[1], **kwargs)
           for red in ("sum", "mean")]
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_reference_free_refuses_a_reference():
    with pytest.raises(LossConfigError, match="reference-free"):
        DPO(TinyCausalLM(), loss_type="simpo", ref_model=TinyCausalLM())
    dpo = DPO(TinyCausalLM(), loss_type="cpo")
    pref, unpref, pm, _, _ = make_batch([([1], [2], [3])])
    with pytest.raises(LossConfigError, match="do not pass ref_chosen_logp"):
        dpo(pref, unpref, prompt_mask=pm, ref_chosen_logp=torch.zeros(1), ref_rejected_logp=torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# WPO


def test_wpo_weight_of_a_uniform_model_is_one():
    """Uniform next-token distribution: p(y_t) = 1/V = sum_v p(v)^2, so every weight is exactly 1."""
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    w = wpo_weights(torch.zeros(2, 4, VOCAB, dtype=torch.float64), seq, mask)
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_wpo_weights_by_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64) * 2
    seq = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask = torch.tensor([[False, False, True, True, False], [False, True, True, True, True]])
    expected = []
    for i in range(2):
        terms = []
        for t in range(4):
            if mask[i, t + 1]:
                lp = logits[i, t].log_softmax(-1)
                terms.append(lp[seq[i, t + 1]].item() - math.log((lp.exp() ** 2).sum().item()))
        expected.append(math.exp(sum(terms) / len(terms)))
    torch.testing.assert_close(wpo_weights(logits, seq, mask), torch.tensor(expected, dtype=torch.float64))


def test_wpo_multiplies_each_pair_loss():
    policy, ref = TinyCausalLM(seed=9), perturbed(TinyCausalLM(seed=9), seed=10)
    pref, unpref, pm, pmask, umask = make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1])])
    kwargs = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    weighted = DPO(policy, reduction="sum", use_weighting=True, ref_model=ref)(pref, unpref, **kwargs)
    seq = torch.cat([pref, unpref])
    cm = torch.cat([pmask, umask]) & ~torch.cat([pm, pm])
    with torch.no_grad():
        w = wpo_weights(policy(seq[:, :-1]), seq, cm)
        lp = sequence_logprobs(policy(seq[:, :-1]), seq, cm, reduction="sum")
        rp = sequence_logprobs(ref(seq[:, :-1]), seq, cm, reduction="sum")
    per_pair = dpo_loss(lp[:2], lp[2:], rp[:2], rp[2:]).losses
    torch.testing.assert_close(weighted.detach(), (per_pair * w[:2] * w[2:]).mean())
    assert not torch.allclose(w, torch.ones_like(w))


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(loss_type=()), "loss_type is empty"),
        (dict(loss_type=("sigmoid", "sigmoid")), "twice"),
        (dict(beta=-0.1), "beta must be a finite number > 0"),
        (dict(beta=True), "beta must be a finite number > 0"),
        (dict(gamma=-0.5), "gamma"),
        (dict(gamma=float("inf")), "gamma"),
        (dict(discopop_tau=0.0), "discopop_tau"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(0.0, 0.0)), "sum to a positive number"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0, -0.5)), "finite numbers >= 0"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0, float("nan"))), "finite numbers >= 0"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "1 value"),
        (dict(loss_type="exo_pair"), "needs label_smoothing > 0"),
        (dict(loss_type=("hinge", "sft"), label_smoothing=0.1), "has no effect"),
    ],
)
def test_bad_configurations(kwargs, match):
    with pytest.raises(LossConfigError, match=match) as info:
        loss_config(**kwargs)
    assert isinstance(info.value, PairpackError) and isinstance(info.value, ValueError)
    with pytest.raises(LossConfigError, match=match):
        DPO(TinyCausalLM(), **kwargs)


def test_missing_inputs():
    with pytest.raises(LossConfigError, match="need reference log-probs"):
        dpo_loss(VEC["policy_chosen"], VEC["policy_rejected"], loss_type=("simpo", "sigmoid"))
    with pytest.raises(LossConfigError, match="pass chosen_tokens"):
        dpo_loss(**VEC, loss_type="sigmoid_norm", reduction="sum")
    with pytest.raises(LossConfigError, match="WPO"):
        dpo_loss(**VEC, loss_type="aot", pair_weights=torch.ones(2, dtype=torch.float64))
    with pytest.raises(LossConfigError, match="WPO"):
        DPO(TinyCausalLM(), loss_type=("sigmoid", "aot_unpaired"), use_weighting=True)
    with pytest.raises(ValueError, match="must all have shape"):
        dpo_loss(**VEC, loss_type="sft", chosen_tokens=torch.ones(3), rejected_tokens=torch.ones(2))


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_per_token_and_reference_free_losses_equal_across_layouts(layout):
    """The token counts of packed and prefix-shared batches (from their scoring map) are the padded
    layout's: length-normalised, reference-free and mixed losses agree."""
    torch.manual_seed(0)
    policy = TinyLM(37, max_len=96, d_model=16, n_layers=2, n_heads=2).double()
    ref = perturbed_tiny(policy)
    pairs = [([1, 2, 3], [4, 5, 6, 7, 8], [4, 5, 9]), ([9], [3], [3, 3, 10, 11])]
    for types, r in ((("simpo",), None), (("orpo", "cpo"), None), (("sigmoid_norm", "sft"), ref)):
        dpo = DPO(policy, reduction="sum", loss_type=types, ref_model=r, attention="dense")
        want = dpo(layout_ref.triplets(pairs))
        got = dpo(layout_ref.build(pairs, layout, per_row=2))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(LossConfigError, match="padded batches only"):
        DPO(policy, use_weighting=True, ref_model=ref)(layout_ref.build(pairs, layout, per_row=2))


def perturbed_tiny(model):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return other
