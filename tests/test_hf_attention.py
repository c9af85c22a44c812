"""pairpack's attention through transformers' AttentionInterface (pairpack.train.hf_attention): split
calls build no attention mask; without the split keyword the "pairpack" implementation is sdpa
(forward and generate); gradient checkpointing recomputes the same attention; what the split rule
does not implement is refused. Equality of every layout with the padded one, per pair, in float32 and
float64, is tests/test_layouts_model.py (hf_llama, attention dense and split)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pairpack  # noqa: E402
from pairpack.errors import ModelError  # noqa: E402
from pairpack.train import hf_attention as hfa  # noqa: E402
from pairpack.train import models as mdl  # noqa: E402
from pairpack.train.dpo import DPO, batch_logprobs  # noqa: E402

from . import layout_ref  # noqa: E402
from .trl_support import tiny_llama  # noqa: E402

PAIRS = [([5, 6, 7], [8, 9], [8, 10, 11]), ([3], [4, 5, 6], [7]), ([1, 2, 3, 4], [5], [6, 7])]


def _dataset(tmp_path) -> pairpack.Dataset:
    with pairpack.Writer(tmp_path / "ds", vocab_size=257, pad_id=0) as w:
        for p, c, r in PAIRS:
            w.add(p, c, r)
    return pairpack.open(tmp_path / "ds")


def test_split_calls_build_no_mask(tmp_path, monkeypatch) -> None:
    import transformers.masking_utils as mu

    model = tiny_llama(0).eval()
    batch = _dataset(tmp_path).batch(np.arange(3), layout="prefix_shared")
    calls = []
    real = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = batch_logprobs(model, batch, attention="split")
    assert calls == [] and model.config._attn_implementation == hfa.ATTN_IMPLEMENTATION
    with torch.no_grad():
        want = batch_logprobs(model, batch, attention="dense")  # the dense 4-D mask, as before
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert mdl.model_layouts(model, "split") == mdl.LAYOUTS


def test_pairpack_implementation_is_sdpa_otherwise() -> None:
    sdpa = tiny_llama(0).eval()
    mine = copy.deepcopy(sdpa)
    mine.set_attn_implementation(hfa.register())
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding: the mask matters
    with torch.no_grad():
        torch.testing.assert_close(mine(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)
        g1 = mine.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        g2 = sdpa.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(g1, g2)


def test_gradient_checkpointing_recomputes_split_attention(tmp_path) -> None:
    batch = _dataset(tmp_path).batch(np.arange(3), layout="prefix_shared")
    grads = []
    for ckpt in (False, True):
        model = tiny_llama(0)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        loss = DPO(model, ref_model=tiny_llama(1), reduction="sum")(batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_what_split_attention_does_not_implement_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    cfg._attn_implementation = "sdpa"
    mistral = transformers.MistralForCausalLM(cfg)
    batch = _dataset(tmp_path).batch(np.arange(3), layout="prefix_shared")
    with pytest.raises(ModelError, match="sliding window of 4 tokens"):
        batch_logprobs(mistral, batch, attention="split")
    flash = tiny_llama(0)
    flash.config._attn_implementation = "flash_attention_2"
    assert not hfa.supports_split(flash)
    with pytest.raises(ModelError, match="cannot run pairpack's split attention"):
        with hfa.use_split(flash):
            pass
    shared = layout_ref.build([([1, 2], [3], [4, 5])], "prefix_shared")
    with pytest.raises(ModelError, match="flash_attention_2.*cannot keep rejected tokens"):
        DPO(flash)(shared)
