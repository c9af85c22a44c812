"""Hugging Face tokenizer adapter: identity, dtype from vocabulary, specials, decoding from the
dataset's own copy, the missing-extra message, and the prompt-prefix invariant."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from pairpack.errors import MissingDependencyError, TokenizerError
from pairpack.tokenization import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    tokenizer_from_manifest,
)

from .conftest import run_cli


@pytest.fixture(scope="module")
def gpt2(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "gpt2.tokenizer.json"


@pytest.fixture(scope="module")
def qwen3(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "qwen3.tokenizer.json"


@pytest.fixture(scope="module")
def gpt2_tok(gpt2) -> HFTokenizer:
    return HFTokenizer(gpt2)


@pytest.fixture(scope="module")
def qwen3_tok(qwen3) -> HFTokenizer:
    return HFTokenizer(qwen3)  # 11 MB: loaded once for the module


def test_identity_of_real_tokenizers(gpt2, qwen3_tok, gpt2_tok):
    ident = gpt2_tok.identity()
    assert ident["kind"] == "huggingface" and ident["name"] == "gpt2.tokenizer.json"
    assert ident["hash"] == xxhash.xxh3_128_hexdigest(gpt2.read_bytes())
    assert (ident["vocab_size"], ident["eos_id"], ident["pad_id"], ident["bos_id"]) == (50257, 50256, 50256, None)
    assert ident["source_path"] == str(gpt2.resolve())
    assert gpt2_tok.encode("Hello world").tolist() == [15496, 995]  # PROVENANCE.md
    q = qwen3_tok
    assert (q.vocab_size, q.eos_id, q.bos_id) == (151669, 151643, None)  # "<s>" is an ordinary BPE token there
    assert q.encode("Hello world").tolist() == [9707, 1879]


def test_explicit_and_configured_special_tokens(tmp_path, qwen3):
    q = HFTokenizer(qwen3, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert (q.eos_id, q.pad_id) == (151645, 151643)
    with pytest.raises(TokenizerError, match="is not a token"):
        HFTokenizer(qwen3, eos_token="<nope>")
    # a tokenizer_config.json beside the file names the specials, as in a model repository
    shutil.copy(qwen3, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                "pad_token": {"content": "<|endoftext|>"}}))
    t = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert (t.eos_id, t.pad_id) == (151645, 151643)


def test_dtype_follows_vocabulary(tmp_path, gpt2_tok, qwen3_tok):
    recs = [{"prompt": "你好，世界", "chosen": "謝謝 你", "rejected": "不"}]
    build(recs, tmp_path / "g", tokenizer=gpt2_tok)
    build(recs, tmp_path / "q", tokenizer=qwen3_tok)
    g, q = pairpack.open(tmp_path / "g"), pairpack.open(tmp_path / "q")
    assert (g.manifest.token_dtype, g.vocab_size) == ("uint16", 50257)
    assert (q.manifest.token_dtype, q.vocab_size) == ("uint32", 151669)
    assert int(np.concatenate(list(q[0])).max()) > 65535  # Chinese text needs ids above uint16
    for ds in (g, q):
        assert ds.decode(ds[0].prompt) == "你好，世界" and ds.decode(ds[0].chosen).startswith("謝謝 你")
        assert ds.verify() == []


def test_dataset_keeps_its_tokenizer_file(tmp_path, gpt2):
    """The tokenizer.json is copied into the dataset (listed with size and checksum), so decoding
    works after the original file is gone; a damaged copy is reported by verify."""
    mine = tmp_path / "tok" / "my.json"
    mine.parent.mkdir()
    shutil.copy(gpt2, mine)
    build([{"prompt": "a b", "chosen": "c", "rejected": "d"}], tmp_path / "ds", tokenizer=mine)
    ds = pairpack.open(tmp_path / "ds")
    f = ds.manifest.tokenizer["file"]
    assert f == {"path": "tokenizer.json", "bytes": mine.stat().st_size, "xxh3_128": ds.manifest.tokenizer["hash"]}
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == mine.read_bytes()
    shutil.rmtree(mine.parent)
    ds2 = pairpack.open(tmp_path / "ds")
    assert ds2.decode(ds2[0].prompt) == "a b"
    out = run_cli("show", tmp_path / "ds", "0")
    assert out.returncode == 0 and "a b" in out.stdout
    with open(tmp_path / "ds" / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    problems = pairpack.open(tmp_path / "ds").verify()
    assert any("tokenizer.file" in p for p in problems)
    assert pairpack.open(tmp_path / "ds").tokenizer is None  # hash differs and the source is gone: ids only


def test_tokenizer_from_manifest_checks_hash(gpt2, gpt2_tok, tmp_path):
    import shutil

    shutil.copyfile(gpt2, tmp_path / "tokenizer.json")
    ident = {**gpt2_tok.identity(), "file": {"path": "tokenizer.json"}}
    assert tokenizer_from_manifest(ident, tmp_path) is not None
    assert tokenizer_from_manifest({**ident, "hash": "0" * 32}, tmp_path) is None
    # only the dataset's own copy is read, never the build machine's source path
    assert tokenizer_from_manifest(ident) is None
    assert tokenizer_from_manifest({**ident, "file": {"path": "../tokenizer.json"}}, tmp_path / "sub") is None
    assert tokenizer_from_manifest({"kind": "bytes", "name": ByteTokenizer.name}) == ByteTokenizer()
    assert tokenizer_from_manifest({"kind": "something-else"}) is None


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        HFTokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    out = run_cli("build", tmp_path / "t.json", "-o", tmp_path / "ds", "--tokenizer", bad)
    assert out.returncode == 1 and "not a valid Hugging Face tokenizer.json" in out.stderr


def test_missing_extra_prints_the_install_command(tmp_path, gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(MissingDependencyError) as e:
        HFTokenizer(gpt2)
    assert e.value.extra == "hf" and 'pip install "pairpack[hf]"' in str(e.value)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    code = ("import sys; sys.modules['tokenizers'] = None; from pairpack.cli import main; "
            f"sys.argv = ['pairpack', 'build', {str(src)!r}, '-o', {str(tmp_path / 'ds')!r}, '--tokenizer', {str(gpt2)!r}]; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 1
    assert 'pip install "pairpack[hf]"' in out.stderr and "Traceback" not in out.stderr


def test_bos_eos_never_doubled(tmp_path, gpt2):
    recs = [{"prompt": "<|endoftext|>Hi", "chosen": "yes<|endoftext|>", "rejected": "no"}]
    build(recs, tmp_path / "a", tokenizer=gpt2)  # default: EOS on completions, no BOS
    ds = pairpack.open(tmp_path / "a")
    eos = 50256
    assert ds[0].chosen.tolist().count(eos) == 1 and ds[0].chosen[-1] == eos and ds[0].rejected[-1] == eos
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"prompt": "Hi", "chosen": "x", "rejected": "y"}) + "\n")
    out = run_cli("build", src, "-o", tmp_path / "b", "--tokenizer", gpt2, "--bos-token", "<|endoftext|>",  # CLI
                  "--add-bos", "--no-add-eos")
    assert out.returncode == 0, out.stderr
    b = pairpack.open(tmp_path / "b")
    assert b.manifest.bos_id == eos
    assert b[0].prompt.tolist()[:2] != [eos, eos] and b[0].prompt[0] == eos  # already there: not doubled
    assert b[1].prompt[0] == eos and b[1].chosen[-1] != eos  # added once; EOS off


_words = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x3000), min_size=1, max_size=20)


@given(triples=st.lists(st.tuples(_words, _words, _words), min_size=1, max_size=6))
@settings(max_examples=15)
def test_prompt_ids_are_a_prefix_of_both_rows(gpt2_tok, triples):
    """Prompt and completions are tokenized separately and concatenated as ids: the stored prompt
    is exactly encode(prompt) and occupies [0, P) of both rows of every batch."""
    recs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    with tempfile.TemporaryDirectory() as d:
        build(recs, Path(d) / "ds", tokenizer=gpt2_tok, drop_identical=False)
        ds = pairpack.open(Path(d) / "ds")
        b = ds.batch(np.arange(len(ds)))
        for i, (p, c, r) in enumerate(triples):
            want_p = gpt2_tok.encode(p).tolist()
            assert ds[i].prompt.tolist() == want_p
            assert ds[i].chosen.tolist() == gpt2_tok.encode(c).tolist() + [50256]
            n = len(want_p)
            assert b.preferred_seq[i, :n].tolist() == want_p == b.unpreferred_seq[i, :n].tolist()
            assert b.prompt_mask[i].sum().item() == n
