"""The model side of the layouts: pairpack's DPO on ``packed`` and ``prefix_shared`` batches (from
``ds.batch(..., layout=...)``) equals the padded layout's, per pair, with TinyLM, an x-transformers
TransformerWrapper (rotary) and a tiny Hugging Face Llama, in float32 and float64; the reference cache
stores the same columns from every layout; models that cannot take a layout, and FlexAttention
without CUDA, raise pairpack errors. tests/layout_ref.py is an independent per-token builder the real
one is checked against."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import pairpack
from pairpack.errors import DeviceError, ModelError, StateError
from pairpack.train import models as mdl
from pairpack.train.dpo import DPO, batch_logprobs, dpo_loss, sequence_logprobs_from
from pairpack.train.reference import REFERENCE_COLUMNS, precompute_reference
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


def _dataset(pairs: list[layout_ref.Pair], root: str) -> pairpack.Dataset:
    with pairpack.Writer(Path(root) / "ds", vocab_size=VOCAB, pad_id=0) as w:
        for p, c, r in pairs:
            w.add(p, c, r)
    return pairpack.open(Path(root) / "ds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=8)
@given(pairs=pair_lists(), row_extra=st.sampled_from([-1, 0, 7, 40, None]), reduction=st.sampled_from(["sum", "mean"]))
@example(pairs=[([5], [6], [7])], row_extra=-1, reduction="sum")  # P = C = R = 1
@example(pairs=[([1, 2, 3], [4, 5, 6, 7, 8], [4, 5, 6, 7, 9]), ([9], [3], [3, 3])], row_extra=None,
         reduction="mean")  # long shared completion prefix; both pairs in one row
def test_every_layout_equals_padded(name: str, dtype: torch.dtype, pairs, row_extra: int | None,
                                    reduction: str) -> None:
    """``row_extra``: -1 one pair per row, None the whole batch in one row, else rows bounded by the
    longest pair's packed need plus that many tokens."""
    policy, ref = _policy_ref(name, dtype)
    need = max(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    row_tokens = 0 if row_extra == -1 else None if row_extra is None else need + row_extra
    with tempfile.TemporaryDirectory() as tmp:
        ds = _dataset(pairs, tmp)
        idx = np.arange(len(pairs))
        padded = ds.batch(idx)
        batches = {layout: ds.batch(idx, layout=layout, max_row_tokens=row_tokens)
                   for layout in ("packed", "prefix_shared")}
    with torch.no_grad():
        want_pol = batch_logprobs(policy, padded, reduction=reduction)
        want_ref = batch_logprobs(ref, padded, reduction=reduction)
        want = dpo_loss(*want_pol, *want_ref, beta=BETA).losses
        dpo = DPO(policy, ref_model=ref, beta=BETA, reduction=reduction, attention="dense")
        want_mean = dpo(padded, ref_chosen_logp=want_ref[0], ref_rejected_logp=want_ref[1])
        # TinyLM and the Hugging Face Llama (through AttentionInterface) also take the rule by parts
        # (split attention, their default)
        for attention in ("dense", "split") if name in ("tinylm", "hf_llama") else ("dense",):
            dpo.attention = attention
            for layout, batch in batches.items():
                at = batch.indices.long()  # the pairs in the batch's order (the padded batch holds 0..B-1)
                got_pol = batch_logprobs(policy, batch, reduction=reduction, attention=attention)
                got_ref = batch_logprobs(ref, batch, reduction=reduction, attention=attention)
                for g, w in zip(got_pol + got_ref, want_pol + want_ref):
                    assert g.dtype == w.dtype
                    torch.testing.assert_close(g, w[at], **TOL[dtype])
                got = dpo_loss(*got_pol, *got_ref, beta=BETA).losses
                torch.testing.assert_close(got, want[at], **TOL[dtype])
                got_mean = dpo(batch, ref_chosen_logp=got_ref[0], ref_rejected_logp=got_ref[1])
                torch.testing.assert_close(got_mean, want_mean, **TOL[dtype])


@settings(max_examples=40)
@given(pairs=pair_lists(), row_extra=st.sampled_from([-1, 0, 7, None]), pad=st.sampled_from([None, 8]))
@example(pairs=[([5], [6], [7])], row_extra=-1, pad=None)  # P = C = R = 1
@example(pairs=[([1, 2, 3], [4], [5, 6, 7, 8]), ([9], [3, 4, 5], [3])], row_extra=None, pad=8)  # R longer than C
def test_split_attention_equals_the_dense_mask(pairs, row_extra: int | None, pad: int | None) -> None:
    """SplitAttention.attend (each sequence causal alone; rejected over [prompt][rejected]) gives
    SDPA-with-dense_mask's output and gradients at every real token (float64), zeros at padding."""
    import torch.nn.functional as F

    need = max(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    row_tokens = 0 if row_extra == -1 else None if row_extra is None else need + row_extra
    if row_tokens and pad:  # a row bound is a whole number of pad multiples
        row_tokens = -(-row_tokens // pad) * pad
    with tempfile.TemporaryDirectory() as tmp:
        ds = _dataset(pairs, tmp)
        for layout in ("packed", "prefix_shared"):
            batch = ds.batch(np.arange(len(pairs)), layout=layout, max_row_tokens=row_tokens, pad_to_multiple_of=pad)
            r, t = batch.input_ids.shape
            gen = torch.Generator().manual_seed(len(pairs) * 31 + t)
            q, k, v = (torch.randn(r, 2, t, 3, dtype=torch.float64, generator=gen, requires_grad=True)
                       for _ in range(3))
            real = batch.attention_mask[:, None, :, None].expand(r, 2, t, 3)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.dense_mask())
            got = batch.split_attention().attend(q, k, v)
            torch.testing.assert_close(got[real], want[real], rtol=1e-12, atol=1e-12)
            assert not got[~real].any(), layout
            w = torch.randn(r, 2, t, 3, dtype=torch.float64, generator=gen) * real
            for gg, gw in zip(torch.autograd.grad((got * w).sum(), (q, k, v)),
                              torch.autograd.grad((want * w).sum(), (q, k, v))):
                torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


@settings(max_examples=25)
@given(pairs=pair_lists())
def test_real_builder_matches_the_reference_builder(pairs) -> None:
    """One pair per row: pairpack.batch.layouts and tests/layout_ref.py agree on every tensor the
    model side reads (ids, positions, the attention rule, the scoring map, varlen boundaries)."""
    with tempfile.TemporaryDirectory() as tmp:
        ds = _dataset(pairs, tmp)
        for layout, per_row in (("packed", 2), ("prefix_shared", 1)):
            got = ds.batch(np.arange(len(pairs)), layout=layout, max_row_tokens=0)
            want = layout_ref.build(pairs, layout, per_row=per_row)
            for f in ("input_ids", "position_ids", "attention_mask", "token_part", "prompt_lengths",
                      "chosen_lengths", "rejected_lengths"):
                assert torch.equal(getattr(got, f).long(), getattr(want, f).long()), (layout, f)
            assert torch.equal(got.dense_mask(), want.dense_mask()), layout
            key = lambda b: sorted(zip(*b.score_index.tolist(), b.score_labels.tolist(),  # noqa: E731
                                       b.score_pair.tolist(), b.score_side.tolist()))
            assert key(got) == key(want), layout
            if layout == "packed":
                assert got.cu_seqlens.tolist() == want.cu_seqlens.tolist() and got.max_seqlen == want.max_seqlen


@settings(max_examples=60)
@given(pairs=pair_lists(), per_row=st.integers(1, 5), pad_extra=st.integers(0, 3))
@example(pairs=[([5], [6], [7])], per_row=1, pad_extra=0)  # P = C = R = 1: every score from the prompt
@example(pairs=[([1, 2], [3], [4, 4]), ([5], [6, 7], [8])], per_row=3, pad_extra=2)  # a pair across rows
def test_derived_scoring_map_equals_the_reference(pairs, per_row: int, pad_extra: int) -> None:
    """PackedBatch carries no scoring map: pairpack.batch.layouts._score_map derives it from
    cu_seqlens, the attention mask, the lengths and the ids. On the reference builder's batches
    (sequences split across rows anywhere, padding after each row) it equals the reference's map
    entry for entry, in order."""
    from pairpack.batch.layouts import _score_map

    for layout in ("packed", "prefix_shared"):
        want = layout_ref.build(pairs, layout, per_row=per_row, pad_extra=pad_extra)
        want.num_scored = int(sum(len(c) + len(r) for _, c, r in pairs))
        index, labels, pair, side = _score_map(want)
        assert index.dtype == labels.dtype == pair.dtype == torch.int64 and side.dtype == torch.int8
        assert torch.equal(index, want.score_index), layout
        assert torch.equal(labels, want.score_labels), layout
        assert torch.equal(pair, want.score_pair) and torch.equal(side, want.score_side), layout


def test_reference_cache_is_the_same_from_every_layout(tmp_path: Path) -> None:
    pairs = [([1, 2, 3, 4], [5, 6], [5, 7, 8]), ([9], [10, 11, 12], [13]), ([9], [14], [15, 16]),
             ([20, 21], [22, 23, 24, 25], [22, 23, 24, 26])]
    ds = _dataset(pairs, str(tmp_path))
    model = _tinylm(0)
    cols = {}
    for layout in ("padded", "packed", "prefix_shared"):
        out = precompute_reference(ds, model, batch_size=3, reduction="sum", layout=layout, progress=False)
        cols[layout] = [np.array(out.column(k)) for k in REFERENCE_COLUMNS]
    for layout in ("packed", "prefix_shared"):
        for g, w in zip(cols[layout], cols["padded"]):
            np.testing.assert_allclose(g, w, rtol=1e-5)
    with pytest.raises(ModelError, match="cannot take layout='prefix_shared'"):
        precompute_reference(ds, _IdsOnly(), layout="prefix_shared", progress=False)
    with pytest.raises(ValueError, match="layout must be one of"):
        precompute_reference(ds, model, layout="shared", progress=False)


@pytest.mark.parametrize("name", ["tinylm", "hf_llama"])
def test_gradients_equal_padded(name: str) -> None:
    """Backward through the scoring map (and, for both models, split attention: the default) gives
    the padded layout's parameter gradients."""
    pairs = [([1, 2, 3, 4], [5, 6], [5, 7, 8]), ([9, 10], [11], [12, 13, 14, 15])]
    grads = {}
    for layout in ("padded", "prefix_shared", "packed"):
        policy, ref = MODELS[name](0).double(), MODELS[name](1).double()
        batch = layout_ref.triplets(pairs) if layout == "padded" else layout_ref.build(pairs, layout, per_row=2)
        DPO(policy, ref_model=ref, beta=BETA)(batch).backward()
        grads[layout] = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    # HF's LlamaRMSNorm computes in float32 even for a float64 model: prefix_shared sums the two
    # completions' gradients of a prompt token before that float32 backward, padded after it, so the
    # two agree to float32 rounding there (3e-8 of gradients up to 0.26; the dense mask gives the
    # same difference as split attention); TinyLM is float64 throughout
    tol = dict(rtol=1e-9, atol=1e-12) if name == "tinylm" else dict(rtol=1e-5, atol=1e-7)
    for layout in ("prefix_shared", "packed"):
        torch.testing.assert_close(grads[layout], grads["padded"], **tol)


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

    with pytest.raises(ModelError, match="split attention needs a model whose attention calls SplitAttention"):
        DPO(_xt(0), attention="split")(shared)
    assert mdl.model_layouts(_xt(0), "split") == ("padded",)
    dense_only = _tinylm(0)
    dense_only.pairpack_attention = ("dense",)  # a pairpack-family module without the split path
    with pytest.raises(ModelError, match=r"attention='split'.*pairpack_attention lists \['dense'\]"):
        DPO(dense_only, attention="split")(shared)
    assert mdl.model_layouts(dense_only, "split") == ("padded",)
    DPO(dense_only)(shared)  # auto: the dense mask

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
