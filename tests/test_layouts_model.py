"""The model side of the layouts: pairpack's DPO on ``packed`` and ``prefix_shared`` batches equals the
padded layout's, per pair, with TinyLM, an x-transformers TransformerWrapper (rotary) and a tiny Hugging
Face Llama, in float32 and float64; models that cannot take a layout, and FlexAttention without CUDA,
raise pairpack errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from pairpack.errors import DeviceError, ModelError, StateError
from pairpack.train import models as mdl
from pairpack.train.dpo import DPO, batch_logprobs, dpo_loss, sequence_logprobs_from
from pairpack.train.tinylm import TinyLM

from . import layout_ref

VOCAB = 37
MAX_LEN = 96
BETA = 0.3


def _tinylm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLM(VOCAB, max_len=MAX_LEN, d_model=16, n_layers=2, n_heads=2)


def _xt(seed: int, flash: bool = True) -> nn.Module:
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(seed)
    # attn_flash: x-transformers' own attention takes its softmax in float32 even for float64 inputs
    # (so it agrees across layouts only to ~1e-8); its SDPA path keeps float64
    return xt.TransformerWrapper(num_tokens=VOCAB, max_seq_len=MAX_LEN, use_abs_pos_emb=False,
                                 attn_layers=xt.Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True,
                                                        attn_flash=flash))


def _hf(seed: int, impl: str = "sdpa") -> nn.Module:
    tr = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_LEN,
                         initializer_range=0.3)
    cfg._attn_implementation = impl
    return tr.LlamaForCausalLM(cfg)


MODELS = {"tinylm": _tinylm, "x_transformers": _xt, "hf_llama": _hf}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@st.composite
def pair_lists(draw: st.DrawFn) -> list[layout_ref.Pair]:
    """1-4 pairs; P, C, R down to 1; chosen and rejected often share a long prefix."""
    tok = st.integers(1, VOCAB - 1)
    out = []
    for _ in range(draw(st.integers(1, 4))):
        p = draw(st.lists(tok, min_size=1, max_size=12))
        shared = draw(st.lists(tok, max_size=8))
        c = shared + draw(st.lists(tok, min_size=0 if shared else 1, max_size=5))
        r = shared + draw(st.lists(tok, min_size=0 if shared else 1, max_size=5))
        if c == r:  # a pair's completions differ (pairpack drops identical ones)
            r = r + [draw(tok)]
        out.append((p, c, r))
    return out


_MODEL_CACHE: dict[tuple[str, torch.dtype], tuple[nn.Module, nn.Module]] = {}


def _policy_ref(name: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    key = (name, dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = (MODELS[name](0).to(dtype).eval(), MODELS[name](1).to(dtype).eval())
    return _MODEL_CACHE[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=8)
@given(pairs=pair_lists(), per_row=st.integers(1, 4), pad_extra=st.integers(0, 3),
       reduction=st.sampled_from(["sum", "mean"]))
@example(pairs=[([5], [6], [7])], per_row=1, pad_extra=0, reduction="sum")  # P = C = R = 1
@example(pairs=[([1, 2, 3], [4, 5, 6, 7, 8], [4, 5, 6, 7, 9]), ([9], [3], [3, 3])], per_row=4, pad_extra=2,
         reduction="mean")  # long shared completion prefix; several sequences in one row
def test_every_layout_equals_padded(name: str, dtype: torch.dtype, pairs, per_row: int, pad_extra: int,
                                    reduction: str) -> None:
    policy, ref = _policy_ref(name, dtype)
    padded = layout_ref.triplets(pairs)
    with torch.no_grad():
        want_pol = batch_logprobs(policy, padded, reduction=reduction)
        want_ref = batch_logprobs(ref, padded, reduction=reduction)
        want = dpo_loss(*want_pol, *want_ref, beta=BETA).losses
        dpo = DPO(policy, ref_model=ref, beta=BETA, reduction=reduction, attention="dense")
        want_mean = dpo(padded, ref_chosen_logp=want_ref[0], ref_rejected_logp=want_ref[1])
        for layout in ("packed", "prefix_shared"):
            batch = layout_ref.build(pairs, layout, per_row=per_row, pad_extra=pad_extra)
            got_pol = batch_logprobs(policy, batch, reduction=reduction, attention="dense")
            got_ref = batch_logprobs(ref, batch, reduction=reduction, attention="dense")
            for g, w in zip(got_pol + got_ref, want_pol + want_ref):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w, **TOL[dtype])
            got = dpo_loss(*got_pol, *got_ref, beta=BETA).losses
            torch.testing.assert_close(got, want, **TOL[dtype])
            got_mean = dpo(batch, ref_chosen_logp=got_ref[0], ref_rejected_logp=got_ref[1])
            torch.testing.assert_close(got_mean, want_mean, **TOL[dtype])


def test_gradients_equal_padded() -> None:
    """Backward through the scoring map gives the padded layout's parameter gradients."""
    pairs = [([1, 2, 3, 4], [5, 6], [5, 7, 8]), ([9, 10], [11], [12, 13, 14, 15])]
    grads = {}
    for layout in ("padded", "prefix_shared", "packed"):
        policy, ref = _tinylm(0).double(), _tinylm(1).double()
        batch = layout_ref.triplets(pairs) if layout == "padded" else layout_ref.build(pairs, layout, per_row=2)
        DPO(policy, ref_model=ref, beta=BETA)(batch).backward()
        grads[layout] = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    for layout in ("prefix_shared", "packed"):
        torch.testing.assert_close(grads[layout], grads["padded"], rtol=1e-9, atol=1e-12)


def test_cached_reference_columns_are_used() -> None:
    """dpo(batch) without a reference model takes the batch's cached columns; without them it
    says how to get them."""
    pairs = [([1, 2], [3, 4], [5]), ([6], [7, 8, 9], [7, 8])]
    policy, ref = _tinylm(0), _tinylm(1)
    with torch.no_grad():
        rc, rr = batch_logprobs(ref, layout_ref.triplets(pairs), reduction="mean")
    cols = {"ref_chosen_logp": rc, "ref_rejected_logp": rr}
    want = DPO(policy, ref_model=ref)(layout_ref.triplets(pairs))
    cached = DPO(policy, ref_model=False)
    for batch in (layout_ref.triplets(pairs, columns=cols), layout_ref.build(pairs, "prefix_shared", columns=cols)):
        torch.testing.assert_close(cached(batch), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(StateError, match="REFERENCE_COLUMNS"):
        cached(layout_ref.build(pairs, "packed"))
    with pytest.raises(TypeError, match="takes the batch alone"):
        cached(layout_ref.triplets(pairs), prompt_mask=torch.ones(2, 5, dtype=torch.bool))


def test_flattened_rows_score_like_the_batch() -> None:
    """The one-row (varlen) form used for flash-attention kernels: same log-probs as the 2-D rows."""
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [8, 9])]
    batch = layout_ref.build(pairs, "packed", per_row=3, pad_extra=2)
    model = _tinylm(0).double().eval()
    ids, pos, index = mdl._flattened(batch)
    n = ids.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(batch.cu_seqlens) - 1), batch.cu_seqlens.diff().long())
    q = torch.arange(n)
    mask = ((seg[:, None] == seg[None, :]) & (q[None, :] <= q[:, None]))[None, None]
    with torch.no_grad():
        got = sequence_logprobs_from(batch, model(ids, positions=pos, attn_mask=mask), score_index=index)
        want = batch_logprobs(model, layout_ref.triplets(pairs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class _IdsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).cumsum(1)


def test_models_that_cannot_take_a_layout() -> None:
    pairs = [([1, 2], [3], [4, 5])]
    shared = layout_ref.build(pairs, "prefix_shared")
    plain = _IdsOnly()
    DPO(plain)(layout_ref.triplets(pairs))  # padded: ids only
    with pytest.raises(ModelError, match=r"_IdsOnly cannot take layout='prefix_shared'.*pairpack_layouts"):
        DPO(plain)(shared)
    assert mdl.model_layouts(plain) == ("padded",)

    xt = pytest.importorskip("x_transformers")
    t5 = xt.TransformerWrapper(num_tokens=VOCAB, max_seq_len=MAX_LEN,
                               attn_layers=xt.Decoder(dim=16, depth=1, heads=2, rel_pos_bias=True))
    with pytest.raises(ModelError, match="RelativePositionBias.*rotary_pos_emb=True"):
        DPO(t5)(shared)
    assert mdl.model_layouts(_xt(0)) == mdl.LAYOUTS
    assert mdl.model_layouts(_xt(0), "flex") == ("padded",)  # x-transformers has no FlexAttention path

    hf = _hf(0)
    hf.config._attn_implementation = "flash_attention_2"  # refused before any kernel is needed
    assert mdl.model_layouts(hf) == ("padded", "packed")
    with pytest.raises(ModelError, match="flash_attention_2.*cannot keep rejected tokens"):
        DPO(hf)(shared)


def test_flex_attention_needs_cuda() -> None:
    batch = layout_ref.build([([1, 2], [3], [4, 5])], "prefix_shared")
    with pytest.raises(DeviceError, match="attention='flex' needs a CUDA device.*attention='dense'"):
        DPO(_tinylm(0), attention="flex")(batch)
    with pytest.raises(ValueError, match="attention must be one of"):
        DPO(_tinylm(0), attention="sparse")


def test_hf_output_object_in_the_padded_layout() -> None:
    """A model returning a ModelOutput (``.logits``) works with padded batches (it used to fail)."""
    pairs = [([1, 2], [3], [4, 5])]
    hf = _hf(0)
    loss = DPO(hf)(layout_ref.triplets(pairs))
    assert abs(loss.item() - 0.6931471805599453) < 1e-6
    with pytest.raises(ModelError, match="neither a logits tensor"):
        mdl.as_logits((1, 2), hf)
