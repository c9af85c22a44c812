"""End to end: JSONL -> pairpack build -> open -> batch -> DPO loss, against an independent
per-pair recomputation from the raw JSON records (issue 3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import pairpack
from pairpack.ingest.build import build
from pairpack.train.dpo import DPO
from pairpack.train.reference import REFERENCE_COLUMNS, precompute_reference, reference_kwargs
from pairpack.train.tinylm import TinyLM

BETA = 0.1
BYTE_VOCAB, BYTE_EOS = 259, 258  # the built-in tokenizer: UTF-8 bytes, EOS appended to text completions


def _records_ids(rng: np.random.Generator, n: int, vocab: int) -> list[dict]:
    recs, prompt = [], None
    for i in range(n):
        if prompt is None or i % 4 == 0:  # runs of pairs share a prompt: stored once (§7.2)
            prompt = rng.integers(0, vocab, rng.integers(1, 9)).tolist()
        recs.append({"prompt": prompt, "chosen": rng.integers(0, vocab, rng.integers(1, 12)).tolist(),
                     "rejected": rng.integers(0, vocab, rng.integers(1, 12)).tolist()})
    return recs


def _records_text(sample_json, n: int) -> list[dict]:
    data = json.loads(sample_json.read_text())
    return [{"q": {"text": r["instruction"]}, "good": r["chosen"], "bad": r["rejected"]} for r in data[:n]]


def _model(vocab: int, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(vocab, max_len=1024, d_model=16, n_layers=1, n_heads=2).double()
    with torch.no_grad():  # far from uniform, so that policy and reference disagree clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _completion_logp(model, prompt: list[int], completion: list[int], reduction: str) -> float:
    """log p(completion | prompt): one unpadded row, a Python loop over the completion tokens."""
    ids = prompt + completion
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    total = 0.0
    for j, tok in enumerate(completion):
        t = len(prompt) + j  # position of this completion token; predicted by logits[t - 1]
        row = logits[t - 1].tolist()
        mx = max(row)
        total += row[tok] - (mx + math.log(sum(math.exp(v - mx) for v in row)))
    return total / len(completion) if reduction == "mean" else total


def _expected_loss(records, to_ids, policy, ref, reduction: str) -> float:
    losses = []
    for rec in records:
        p, c, r = to_ids(rec)
        h = ((_completion_logp(policy, p, c, reduction) - _completion_logp(ref, p, c, reduction))
             - (_completion_logp(policy, p, r, reduction) - _completion_logp(ref, p, r, reduction)))
        losses.append(math.log1p(math.exp(-BETA * h)))  # -log sigmoid(beta * h)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ids_jsonl_to_loss(tmp_path, reduction):
    rng = np.random.default_rng(7)
    vocab = 50
    records = _records_ids(rng, 37, vocab)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ds"
    build([src], out, vocab_size=vocab, pad_id=3, shard_bytes=64)  # several shards; pad is a real id
    ds = pairpack.open(out)
    assert len(ds) == len(records) and len(ds.manifest.shards) > 1
    policy, ref = _model(vocab, 0), _model(vocab, 1)
    order = rng.permutation(len(ds))  # any order, padded to a multiple: the loss is per pair
    batch = ds.batch(order, pad_to_multiple_of=8)
    loss = DPO(policy, beta=BETA, reduction=reduction, ref_model=ref)(**batch.as_kwargs()).item()
    expected = _expected_loss(records, lambda r: (r["prompt"], r["chosen"], r["rejected"]), policy, ref,
                              reduction)
    assert abs(loss - expected) <= 1e-6, (loss, expected)
    assert abs(loss - math.log(2)) > 1e-3  # policy != reference: the comparison is not trivial


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_text_jsonl_to_loss_with_cached_reference(tmp_path, sample_json, reduction):
    """Real text pairs (dotted field paths, byte tokenizer), the reference from the column cache."""
    records = _records_text(sample_json, 12)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ds"
    build([src], out, prompt="q.text", chosen="good", rejected="bad")
    policy, ref = _model(BYTE_VOCAB, 0), _model(BYTE_VOCAB, 1)
    ds = precompute_reference(out, ref, batch_size=5, reduction=reduction)  # 3 cache batches
    batch = ds.batch(np.arange(len(ds))[::-1], columns=REFERENCE_COLUMNS)
    dpo = DPO(policy, beta=BETA, reduction=reduction, ref_model=False)
    loss = dpo(**batch.as_kwargs(), **reference_kwargs(batch)).item()

    def to_ids(r):
        enc = lambda s: list(s.encode("utf-8"))  # noqa: E731
        return enc(r["q"]["text"]), enc(r["good"]) + [BYTE_EOS], enc(r["bad"]) + [BYTE_EOS]

    expected = _expected_loss(records, to_ids, policy, ref, reduction)
    # the cache holds float32 reference log-probs: their rounding bounds the difference
    assert abs(loss - expected) <= 1e-6, (loss, expected)
    assert abs(loss - math.log(2)) > 1e-3
