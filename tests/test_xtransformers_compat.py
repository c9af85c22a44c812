"""pairpack's DPO against x-transformers' released DPO, on the same model and reference.

x-transformers trims a length-N loss mask with ``mask[:, :-1]``, which drops the first
completion token and scores the first pad. ``xtransformers_inputs`` feeds it masks already
shifted onto the targets (length N - 1), which it uses untrimmed; then the two losses agree.
"""

from __future__ import annotations

import pytest
import torch

xt = pytest.importorskip("x_transformers")
from x_transformers.dpo import DPO as XTDPO  # noqa: E402

from pairpack.train.dpo import DPO, xtransformers_inputs  # noqa: E402

VOCAB = 13
PAD_ID = 0
BETA = 0.5


def _layout():
    """Two pairs of different prompt and completion lengths, right-padded with PAD_ID.

    Returns (preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask).
    """
    pairs = [  # (prompt, chosen, rejected)
        ([3, 4, 5], [6, 7], [8, 9, 10, 11]),
        ([12], [1, 2, 3, 4, 5], [6]),
    ]
    n = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) + 2  # extra padding on every row
    b = len(pairs)
    out = [torch.full((b, n), PAD_ID, dtype=torch.long) for _ in range(2)]
    masks = [torch.zeros(b, n, dtype=torch.bool) for _ in range(3)]
    for i, (p, c, r) in enumerate(pairs):
        out[0][i, : len(p) + len(c)] = torch.tensor(p + c)
        out[1][i, : len(p) + len(r)] = torch.tensor(p + r)
        masks[0][i, : len(p)] = True
        masks[1][i, : len(p) + len(c)] = True
        masks[2][i, : len(p) + len(r)] = True
    return (*out, *masks)


@pytest.fixture
def models():
    """An x-transformers DPO whose reference is perturbed, so the loss is not ln 2."""
    torch.manual_seed(0)
    model = xt.TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=32,
        attn_layers=xt.Decoder(dim=16, depth=1, heads=2),
    ).double().eval()
    xt_dpo = XTDPO(model, beta=BETA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in xt_dpo.ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    ours = DPO(model, beta=BETA, reduction="mean", ref_model=xt_dpo.ref_model)
    return xt_dpo, ours


def test_shifted_masks_match_xtransformers(models):
    xt_dpo, ours = models
    pref, unpref, pm, pmask, umask = _layout()
    expected = ours(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    fed = xtransformers_inputs(pref, unpref, pm, pmask, umask)
    assert fed["prompt_mask"].shape == (pref.shape[0], pref.shape[1] - 1)
    got = xt_dpo(**fed)
    assert abs(expected.item() - 0.6931) > 1e-3  # not the trivial policy == reference value
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_shifted_masks_match_without_padding(models):
    """Seq masks left as None (no pads) must also be shifted, as all-True (B, N - 1) masks."""
    xt_dpo, ours = models
    pref = torch.tensor([[3, 4, 6, 7, 8], [5, 6, 9, 9, 1]])
    unpref = torch.tensor([[3, 4, 1, 2, 3], [5, 6, 2, 4, 4]])
    pm = torch.tensor([[True, True, False, False, False]] * 2)
    expected = ours(pref, unpref, prompt_mask=pm)
    torch.testing.assert_close(xt_dpo(**xtransformers_inputs(pref, unpref, pm)), expected, rtol=1e-9, atol=1e-9)


def test_raw_masks_are_off_by_one(models):
    """Fed the length-N masks, x-transformers scores targets shifted by one position.

    Its loss differs from ours, and equals ours computed on masks moved one position to the
    right, i.e. scoring the target after each completion token: no first completion token,
    one pad.
    """
    xt_dpo, ours = models
    pref, unpref, pm, pmask, umask = _layout()
    raw = xt_dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    correct = ours(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert abs(raw.item() - correct.item()) > 1e-4

    def shift_right(mask, fill):
        return torch.cat([torch.full_like(mask[:, :1], fill), mask[:, :-1]], dim=1)

    emulated = ours(
        pref,
        unpref,
        prompt_mask=shift_right(pm, True),
        preferred_seq_mask=shift_right(pmask, True),
        unpreferred_seq_mask=shift_right(umask, True),
    )
    torch.testing.assert_close(raw, emulated, rtol=1e-9, atol=1e-9)
