"""End-to-end smoke test of build -> open -> batch on the bundled sample."""

from __future__ import annotations

import json

import numpy as np

import pairpack
from pairpack.ingest.build import build


def test_build_sample_roundtrip(tmp_path, sample_json):
    rep = build([sample_json], tmp_path / "ds", prompt="instruction")
    ds = pairpack.open(tmp_path / "ds")
    records = json.loads(sample_json.read_text())
    assert len(ds) == rep.pairs == len(records)
    tok = ds.tokenizer
    for i in (0, 17, len(records) - 1):
        pair = ds[i]
        assert tok.decode(pair.prompt) == records[i]["instruction"]
        assert tok.decode(pair.chosen) == records[i]["chosen"] + "<eos>"
        assert tok.decode(pair.rejected) == records[i]["rejected"] + "<eos>"
    b = ds.batch(np.arange(8))
    assert b.preferred_seq.shape == b.unpreferred_seq.shape == b.prompt_mask.shape
    assert ds.verify() == []


def test_info_json_lengths_are_numpy_summaries(tmp_path, sample_json):
    from tests.conftest import run_cli

    build([sample_json], tmp_path / "ds", prompt="instruction")
    out = run_cli("info", tmp_path / "ds", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["lengths"]
    ln = pairpack.open(tmp_path / "ds").lengths
    for name, x in (("prompt", ln[0]), ("chosen", ln[1]), ("unpreferred row", ln[0] + ln[2])):
        assert got[name]["min"] == x.min() and got[name]["max"] == x.max()
        assert got[name]["p90"] == np.percentile(x, 90, method="inverted_cdf") and got[name]["mean"] == x.mean()
