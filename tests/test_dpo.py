"""Tests for pairpack.dpo: hand-computed values, alignment, padding and masking invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from pairpack.train.dpo import DPO, dpo_loss, sequence_logprobs

VOCAB = 11
DIM = 8
PAD_ID = 0

FAST = settings(deadline=None)  # example counts come from the profile in conftest.py


# ---------------------------------------------------------------------------------------------
# helpers


class TinyCausalLM(nn.Module):
    """Embedding + one causal single-head attention layer + unembedding; (B, N) -> (B, N, V)."""

    def __init__(self, seed: int = 0, max_len: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(max_len, DIM, generator=gen, dtype=torch.float64) * 0.3)
        self.qkv = nn.Parameter(torch.randn(DIM, 3 * DIM, generator=gen, dtype=torch.float64) / DIM**0.5)
        self.out = nn.Parameter(torch.randn(DIM, VOCAB, generator=gen, dtype=torch.float64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tok[ids] + self.pos[:n]
        q, k, v = (x @ self.qkv).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x @ self.out


def perturbed(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """A copy of ``model`` with every parameter moved by Gaussian noise (a distinct reference)."""
    other = TinyCausalLM(seed=0)
    other.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return other


def make_batch(pairs, extra_pad: int = 0, pad_id: int = PAD_ID):
    """Right-pad ``[(prompt, chosen, rejected), ...]`` id lists into x-transformers' triplet.

    Returns (preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask),
    all (B, N) with N = longest row + extra_pad.
    """
    n = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) + extra_pad
    b = len(pairs)
    pref = torch.full((b, n), pad_id, dtype=torch.long)
    unpref = torch.full((b, n), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(b, n, dtype=torch.bool)
    pref_mask = torch.zeros(b, n, dtype=torch.bool)
    unpref_mask = torch.zeros(b, n, dtype=torch.bool)
    for i, (p, c, r) in enumerate(pairs):
        pref[i, : len(p) + len(c)] = torch.tensor(p + c)
        unpref[i, : len(p) + len(r)] = torch.tensor(p + r)
        prompt_mask[i, : len(p)] = True
        pref_mask[i, : len(p) + len(c)] = True
        unpref_mask[i, : len(p) + len(r)] = True
    return pref, unpref, prompt_mask, pref_mask, unpref_mask


token = st.integers(1, VOCAB - 1)
pair_st = st.tuples(
    st.lists(token, min_size=1, max_size=4),  # prompt: P >= 1, the first token has no context
    st.lists(token, min_size=1, max_size=5),  # chosen completion
    st.lists(token, min_size=1, max_size=5),  # rejected completion
)
pairs_st = st.lists(pair_st, min_size=1, max_size=3)


@st.composite
def logits_batch(draw, dtype=torch.float64):
    """Random (logits, seq, completion_mask) with right padding and arbitrary pad ids."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, n, VOCAB, generator=gen, dtype=torch.float64) * 3).to(dtype)
    seq = torch.randint(0, VOCAB, (b, n), generator=gen)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        p = draw(st.integers(0, n))
        c = draw(st.integers(0, n - p))
        mask[i, p : p + c] = True
    return logits, seq, mask


def manual_logprobs(logits, seq, completion_mask):
    """Loop reference: sum over t of log_softmax(logits[i, t])[seq[i, t+1]] where mask[i, t+1]."""
    out = []
    lp = logits.double().log_softmax(-1)
    for i in range(seq.shape[0]):
        total = 0.0
        for t in range(seq.shape[1] - 1):
            if completion_mask[i, t + 1]:
                total += lp[i, t, seq[i, t + 1]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# dpo_loss: hand-computed vector (float64)

VEC = {
    "policy_chosen": torch.tensor([-10.0, -20.5], dtype=torch.float64),
    "policy_rejected": torch.tensor([-12.0, -19.0], dtype=torch.float64),
    "ref_chosen": torch.tensor([-11.0, -20.0], dtype=torch.float64),
    "ref_rejected": torch.tensor([-11.5, -19.5], dtype=torch.float64),
}


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, [0.620957, 0.744397]),
        ("sigmoid", 0.1, [0.635957, 0.734397]),  # conservative DPO
        ("robust", 0.0, [0.620957, 0.744397]),  # rDPO with no noise is DPO
        ("robust", 0.1, [0.602207, 0.756897]),
        ("hinge", 0.0, [0.85, 1.1]),
        ("ipo", 0.0, [12.25, 36.0]),
    ],
)
def test_hand_computed_losses(loss_type, label_smoothing, expected):
    out = dpo_loss(**VEC, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=5e-7)


def test_hand_computed_metrics():
    out = dpo_loss(**VEC, beta=0.1)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["rewards/chosen"] == pytest.approx(0.025, abs=1e-12)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-12)
    assert m["rewards/margins"] == pytest.approx(0.025, abs=1e-12)
    assert m["rewards/accuracies"] == 0.5
    assert m["logps/chosen"] == pytest.approx(-15.25)
    assert m["logps/rejected"] == pytest.approx(-15.5)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, -0.05], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.05], dtype=torch.float64))
    assert all(not v.requires_grad for v in out.metrics.values())


def test_dpo_loss_gradient_sign():
    """Raising the chosen log-prob must lower the sigmoid loss (guards a swapped chosen/rejected)."""
    pc = VEC["policy_chosen"].clone().requires_grad_(True)
    pr = VEC["policy_rejected"].clone().requires_grad_(True)
    out = dpo_loss(pc, pr, VEC["ref_chosen"], VEC["ref_rejected"], beta=0.1)
    out.losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@FAST
@given(beta=st.floats(0.01, 5.0), eps=st.floats(0.0, 0.49), h=st.floats(-50, 50))
def test_robust_is_unbiased(beta, eps, h):
    """rDPO averaged over a label flip with probability eps equals plain DPO."""
    z = torch.zeros(1, dtype=torch.float64)
    hh = torch.tensor([h], dtype=torch.float64)
    rob = dpo_loss(hh, z, z, z, beta=beta, loss_type="robust", label_smoothing=eps).losses
    rob_flip = dpo_loss(z, hh, z, z, beta=beta, loss_type="robust", label_smoothing=eps).losses
    plain = -F.logsigmoid(beta * hh)
    # Unbiasedness of rDPO: (1-eps)*L(h) + eps*L(-h) == -logsigmoid(beta*h).
    torch.testing.assert_close((1 - eps) * rob + eps * rob_flip, plain, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# init invariant: policy == reference


@FAST
@given(pairs=pairs_st, extra_pad=st.integers(0, 3), beta=st.sampled_from([0.01, 0.1, 0.5, 2.0]),
       reduction=st.sampled_from(["sum", "mean"]))
@example(pairs=[([1], [2], [3])], extra_pad=0, beta=0.1, reduction="mean")
def test_policy_equals_reference(pairs, extra_pad, beta, reduction):
    model = TinyCausalLM(seed=1)
    batch = make_batch(pairs, extra_pad)
    pref, unpref, pm, pmask, umask = batch
    kwargs = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)

    loss, metrics = DPO(model, beta=beta, reduction=reduction)(pref, unpref, **kwargs, return_metrics=True)
    assert loss.item() == math.log(2)  # exactly: h is exactly 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0, key

    hinge = DPO(model, beta=beta, reduction=reduction, loss_type="hinge")(pref, unpref, **kwargs)
    assert hinge.item() == 1.0
    ipo = DPO(model, beta=beta, reduction=reduction, loss_type="ipo")(pref, unpref, **kwargs)
    assert ipo.item() == pytest.approx(1 / (4 * beta**2), rel=1e-14)
    robust = DPO(model, beta=beta, reduction=reduction, loss_type="robust", label_smoothing=0.2)(
        pref, unpref, **kwargs
    )
    assert robust.item() == pytest.approx(math.log(2), rel=1e-14)


# ---------------------------------------------------------------------------------------------
# padding invariance


@FAST
@given(pairs=pairs_st, extra_pad=st.integers(0, 4), reduction=st.sampled_from(["sum", "mean"]),
       loss_type=st.sampled_from(["sigmoid", "hinge", "ipo"]))
@example(pairs=[([1], [2], [3, 4, 5])], extra_pad=0, reduction="mean", loss_type="sigmoid")
def test_padded_batch_equals_pairwise_unpadded(pairs, extra_pad, reduction, loss_type):
    policy, ref = TinyCausalLM(seed=2), perturbed(TinyCausalLM(seed=2), seed=3)
    pref, unpref, pm, pmask, umask = make_batch(pairs, extra_pad)
    dpo = DPO(policy, beta=0.5, reduction=reduction, loss_type=loss_type, ref_model=ref)
    batched = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)

    def logp(model, prompt, completion):
        # One unpadded sequence, scored independently of the DPO module.
        seq = torch.tensor([prompt + completion])
        cmask = torch.tensor([[False] * len(prompt) + [True] * len(completion)])
        return sequence_logprobs(model(seq), seq, cmask, reduction=reduction)

    per_pair = []
    for p, c, r in pairs:
        with torch.no_grad():
            rc, rr = logp(ref, p, c), logp(ref, p, r)
        out = dpo_loss(logp(policy, p, c), logp(policy, p, r), rc, rr, beta=0.5, loss_type=loss_type)
        per_pair.append(out.losses)
    torch.testing.assert_close(batched, torch.cat(per_pair).mean(), rtol=1e-10, atol=1e-12)


def test_loss_is_not_trivially_constant():
    """Guard for the invariance tests: with a perturbed reference the loss is far from ln 2."""
    policy, ref = TinyCausalLM(seed=2), perturbed(TinyCausalLM(seed=2), seed=3)
    pref, unpref, pm, pmask, umask = make_batch([([1, 2], [3, 4], [5, 6, 7])], 2)
    loss = DPO(policy, ref_model=ref, beta=1.0)(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask,
                                               unpreferred_seq_mask=umask)
    assert abs(loss.item() - math.log(2)) > 1e-3


# ---------------------------------------------------------------------------------------------
# sequence_logprobs: alignment, masking, gradients, reductions


def test_docstring_worked_example():
    """Prompt p0 p1, completion c0 c1, one pad: exactly logits[1]->c0 and logits[2]->c1 are scored."""
    seq = torch.tensor([[5, 6, 7, 8, 0]])
    cmask = torch.tensor([[False, False, True, True, False]])
    logits = torch.randn(1, 5, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lp = logits.log_softmax(-1)
    expected = lp[0, 1, 7] + lp[0, 2, 8]
    got = sequence_logprobs(logits, seq, cmask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-14)
    # x-transformers' released trimming (mask[:, :-1] on the inputs) would instead score
    # logits[2]->c1 and logits[3]->pad; make sure we are not doing that.
    xt_style = lp[0, 2, 8] + lp[0, 3, 0]
    assert got.item() != pytest.approx(xt_style.item())
    assert sequence_logprobs(logits, seq, cmask, reduction="mean").item() == pytest.approx(expected.item() / 2)


@FAST
@given(batch=logits_batch(), trimmed=st.booleans())
def test_matches_loop_reference(batch, trimmed):
    logits, seq, cmask = batch
    if trimmed:  # logits of length N - 1 (the model was fed seq[:, :-1]) give the same result
        logits = logits[:, :-1]
    got = sequence_logprobs(logits, seq, cmask)
    torch.testing.assert_close(got, manual_logprobs(logits, seq, cmask), rtol=1e-12, atol=1e-12)


@FAST
@given(batch=logits_batch(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
@example(batch=(torch.zeros(1, 3, VOCAB), torch.zeros(1, 3, dtype=torch.long),
                torch.tensor([[False, True, True]])), dtype=torch.float32)
def test_mean_is_exactly_sum_over_count(batch, dtype):
    logits, seq, cmask = batch
    logits = logits.to(dtype)
    total = sequence_logprobs(logits, seq, cmask, reduction="sum")
    mean = sequence_logprobs(logits, seq, cmask, reduction="mean")
    count = cmask[:, 1:].sum(-1)
    nonempty = count > 0
    assert torch.equal(mean[nonempty], total[nonempty] / count[nonempty].to(total.dtype))
    # Empty rows (no scored target) are 0 under both reductions, never NaN.
    assert torch.equal(mean[~nonempty], torch.zeros_like(mean[~nonempty]))
    assert torch.equal(total[~nonempty], torch.zeros_like(total[~nonempty]))


@FAST
@given(batch=logits_batch(), junk=st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -1e30]),
       pad_ids=st.sampled_from([-100, -1, 0, VOCAB - 1, 10**6]), reduction=st.sampled_from(["sum", "mean"]))
def test_unscored_positions_cannot_leak(batch, junk, pad_ids, reduction):
    """Garbage logits on unscored rows and arbitrary ids at unscored targets change nothing."""
    logits, seq, cmask = batch
    base = sequence_logprobs(logits, seq, cmask, reduction=reduction)

    scored = torch.zeros_like(cmask)
    scored[:, :-1] = cmask[:, 1:]  # logits rows whose target is scored
    dirty = logits.clone()
    dirty[~scored] = junk
    seq2 = torch.where(cmask, seq, pad_ids)  # every non-completion id replaced, prompt included
    dirty.requires_grad_(True)
    got = sequence_logprobs(dirty, seq2, cmask, reduction=reduction)
    assert torch.equal(got, base)
    got.sum().backward()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~scored] == 0).all()


@FAST
@given(batch=logits_batch(), reduction=st.sampled_from(["sum", "mean"]))
def test_gradient_only_on_scored_rows(batch, reduction):
    logits, seq, cmask = batch
    logits = logits.clone().requires_grad_(True)
    sequence_logprobs(logits, seq, cmask, reduction=reduction).sum().backward()
    scored = torch.zeros_like(cmask)
    scored[:, :-1] = cmask[:, 1:]
    grad = logits.grad
    assert (grad[~scored] == 0).all()  # prompt-only, pad-only and last positions
    # Each scored row gets a nonzero gradient (d log_softmax / d logits is never all zero).
    assert (grad[scored].abs().sum(-1) > 0).all()


def test_first_completion_token_matters():
    """The logit that predicts the first completion token changes log-probs and the DPO loss."""
    pref, unpref, pm, pmask, umask = make_batch([([1, 2, 3], [4, 5], [6, 7, 8]), ([9], [1, 2, 3, 4], [5])], 1)
    b = pref.shape[0]
    seq = torch.cat([pref, unpref])
    cmask = torch.cat([pmask, umask]) & ~torch.cat([pm, pm])
    logits = torch.randn(*seq.shape, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = sequence_logprobs(logits, seq, cmask)
    for row, prompt_len in [(0, 3), (1, 1), (b, 3), (b + 1, 1)]:
        bumped = logits.clone()
        bumped[row, prompt_len - 1, seq[row, prompt_len]] += 2.0
        changed = sequence_logprobs(bumped, seq, cmask)
        assert changed[row] > base[row]  # the first completion token became likelier
        others = [r for r in range(seq.shape[0]) if r != row]
        assert torch.equal(changed[others], base[others])

    # Through the module: a model whose logits we control.
    class FixedLogits(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = nn.Parameter(table)

        def forward(self, ids):
            return self.table[: ids.shape[0], : ids.shape[1]]

    ref_logp = torch.zeros(b, dtype=torch.float64)
    kwargs = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                  ref_chosen_logp=ref_logp, ref_rejected_logp=ref_logp)
    loss = DPO(FixedLogits(logits), ref_model=False, beta=1.0)(pref, unpref, **kwargs)
    bumped = logits.clone()
    bumped[0, 2, pref[0, 3]] += 2.0  # chosen row 0, first completion token at position 3
    loss2 = DPO(FixedLogits(bumped), ref_model=False, beta=1.0)(pref, unpref, **kwargs)
    assert loss2 < loss
    # ...while the logit row that "predicts" the pad after the longest chosen completion does not.
    last = logits.clone()
    last[0, 4] = 1e6
    loss3 = DPO(FixedLogits(last), ref_model=False, beta=1.0)(pref, unpref, **kwargs)
    assert torch.equal(loss3, loss)


@FAST
@given(pairs=pairs_st, extra_pad=st.integers(1, 3), new_pad=st.sampled_from([1, 5, VOCAB - 1]))
def test_pad_ids_do_not_matter_through_the_model(pairs, extra_pad, new_pad):
    policy, ref = TinyCausalLM(seed=4), perturbed(TinyCausalLM(seed=4), seed=5)
    a = make_batch(pairs, extra_pad, pad_id=PAD_ID)
    b = make_batch(pairs, extra_pad, pad_id=new_pad)
    dpo = DPO(policy, ref_model=ref, beta=1.0)
    la = dpo(a[0], a[1], prompt_mask=a[2], preferred_seq_mask=a[3], unpreferred_seq_mask=a[4])
    lb = dpo(b[0], b[1], prompt_mask=b[2], preferred_seq_mask=b[3], unpreferred_seq_mask=b[4])
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-13)


def test_half_precision_is_upcast():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, VOCAB, generator=gen) * 20
    seq = torch.randint(0, VOCAB, (2, 6), generator=gen)
    cmask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    half = logits.to(torch.bfloat16)
    got = sequence_logprobs(half, seq, cmask)
    assert got.dtype == torch.float32
    # Same inputs (the bf16-rounded logits) in float64: only float32 rounding remains.
    torch.testing.assert_close(got.double(), manual_logprobs(half.double(), seq, cmask), rtol=1e-6, atol=1e-5)
    assert sequence_logprobs(logits.double(), seq, cmask).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# the DPO module


class CountingLM(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    def forward(self, ids):
        self.batch_sizes.append(ids.shape[0])
        return self.inner(ids)


def _small_batch():
    return make_batch([([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [10, 1])], 1)


def test_each_model_runs_once_on_the_concatenated_batch():
    policy = CountingLM(TinyCausalLM(seed=6))
    ref = CountingLM(perturbed(TinyCausalLM(seed=6), seed=7))
    pref, unpref, pm, pmask, umask = _small_batch()
    DPO(policy, ref_model=ref)(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert policy.batch_sizes == [4] and ref.batch_sizes == [4]


def test_reference_is_frozen_and_excluded_from_parameters():
    policy = TinyCausalLM(seed=6)
    dpo = DPO(policy)
    assert dpo.ref_model is not policy
    assert all(not p.requires_grad for p in dpo.ref_model.parameters())
    assert [id(p) for p in dpo.parameters()] == [id(p) for p in policy.parameters()]
    dpo.train()
    assert policy.training and not dpo.ref_model.training

    pref, unpref, pm, pmask, umask = _small_batch()
    ref_moved = perturbed(policy, seed=8)
    dpo = DPO(policy, ref_model=ref_moved, beta=1.0)
    dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in ref_moved.parameters())


def test_default_reference_is_a_snapshot():
    """Changing the policy after construction must not change the default reference."""
    policy = TinyCausalLM(seed=6)
    dpo = DPO(policy, beta=1.0)
    with torch.no_grad():
        policy.out.add_(0.5)
    pref, unpref, pm, pmask, umask = _small_batch()
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert loss.item() != math.log(2)


def test_precomputed_reference_logps():
    policy, ref = TinyCausalLM(seed=6), perturbed(TinyCausalLM(seed=6), seed=9)
    pref, unpref, pm, pmask, umask = _small_batch()
    masks = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    for reduction in ("sum", "mean"):
        with_ref = DPO(policy, ref_model=ref, reduction=reduction)
        loss, metrics = with_ref(pref, unpref, **masks, return_metrics=True)
        seq = torch.cat([pref, unpref])
        cmask = torch.cat([pmask, umask]) & ~torch.cat([pm, pm])
        with torch.no_grad():
            rc, rr = sequence_logprobs(ref(seq), seq, cmask, reduction=reduction).split(2)
            # The module's helper (which feeds seq[:, :-1]) gives the same precomputed values.
            torch.testing.assert_close(with_ref.completion_logprobs(ref, seq, cmask), torch.cat([rc, rr]))

        counting = CountingLM(ref)
        dpo = DPO(policy, ref_model=counting, reduction=reduction)
        loss2 = dpo(pref, unpref, **masks, ref_chosen_logp=rc, ref_rejected_logp=rr)
        assert counting.batch_sizes == []  # reference not run
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=0)

        no_ref = DPO(policy, ref_model=False, reduction=reduction)
        assert no_ref.ref_model is None
        loss3, metrics3 = no_ref(pref, unpref, **masks, ref_chosen_logp=rc, ref_rejected_logp=rr, return_metrics=True)
        torch.testing.assert_close(loss3, loss, rtol=1e-12, atol=0)
        assert metrics3.keys() == metrics.keys()


def test_seq_masks_default_to_all_real():
    policy, ref = TinyCausalLM(seed=6), perturbed(TinyCausalLM(seed=6), seed=9)
    pref, unpref, pm, _, _ = make_batch([([1, 2], [3, 4, 5], [6, 7, 8])])  # no padding at all
    dpo = DPO(policy, ref_model=ref)
    ones = torch.ones_like(pm)
    torch.testing.assert_close(
        dpo(pref, unpref, prompt_mask=pm),
        dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=ones, unpreferred_seq_mask=ones),
        rtol=0, atol=0,
    )


# ---------------------------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=-0.1), "beta must be a finite number > 0"),
        (dict(beta=float("nan")), "beta must be a finite number > 0"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(loss_type="hinge", label_smoothing=0.1), "has no effect with loss_type='hinge'"),
        (dict(loss_type="ipo", label_smoothing=0.1), "has no effect with loss_type='ipo'"),
    ],
)
def test_loss_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(**VEC, **kwargs)
    with pytest.raises(ValueError, match=match):
        DPO(TinyCausalLM(), **kwargs)


def test_other_argument_errors():
    with pytest.raises(ValueError, match="must all have shape"):
        dpo_loss(VEC["policy_chosen"], VEC["policy_rejected"][:1], VEC["ref_chosen"], VEC["ref_rejected"])
    with pytest.raises(ValueError, match="reduction must be one of"):
        DPO(TinyCausalLM(), reduction="token_mean")
    with pytest.raises(TypeError, match="ref_model must be None, False or an nn.Module"):
        DPO(TinyCausalLM(), ref_model=True)

    logits = torch.zeros(1, 4, VOCAB)
    seq = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sequence_logprobs(logits, seq, mask, reduction="avg")
    with pytest.raises(TypeError, match="completion_mask must be a bool tensor"):
        sequence_logprobs(logits, seq, mask.long())
    with pytest.raises(ValueError, match="logits must have shape"):
        sequence_logprobs(torch.zeros(1, 2, VOCAB), seq, mask)
    with pytest.raises(TypeError, match="seq must hold integer token ids"):
        sequence_logprobs(logits, seq.float(), mask)

    dpo = DPO(TinyCausalLM())
    pref, unpref, pm, pmask, umask = _small_batch()
    with pytest.raises(ValueError, match="must both have shape"):
        dpo(pref, unpref[:, :-1], prompt_mask=pm)
    with pytest.raises(TypeError, match="prompt_mask must be a bool tensor"):
        dpo(pref, unpref, prompt_mask=pm.long())
    with pytest.raises(ValueError, match="preferred_seq_mask must have shape"):
        dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask[:, 1:])
    with pytest.raises(ValueError, match="pass both ref_chosen_logp and ref_rejected_logp"):
        dpo(pref, unpref, prompt_mask=pm, ref_chosen_logp=torch.zeros(2))
    with pytest.raises(ValueError, match="N >= 2"):
        dpo(pref[:, :1], unpref[:, :1], prompt_mask=pm[:, :1])
    with pytest.raises(ValueError, match="holds no reference model"):
        DPO(TinyCausalLM(), ref_model=False)(pref, unpref, prompt_mask=pm)
