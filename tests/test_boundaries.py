"""Rows against the tokenizer's own whole-row tokenization (issue 27): chat rows equal the rendered
conversation tokenized at once; boundary pairs are counted against an independent whole-row
tokenization; ``--boundary row`` stores every row exactly as tokenized whole (TRL's convention).

The expected ids come from the ``tokenizers`` package and ``jinja2`` directly, never from
pairpack's encoding or rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from pairpack.tokenization import load_tokenizer

from .conftest import run_cli

tokenizers = pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")

# completions that start (and end) with the whitespace that merges across joins
_WS = st.sampled_from(["", " ", "  ", "\n", "\n\n", " \n", "\t", "\n \n"])
_WORD = st.sampled_from(["Hello", "no", "1.5", "你好", "it's", "x", "<b>", "Yes!"])
_TEXT = st.builds(lambda a, b, c, d: a + b + c + d, _WS, _WORD, st.sampled_from(["", " ", " world", "\n"]), _WS)


@pytest.fixture(scope="module")
def tok_files(shared_dir) -> dict[str, Path]:
    t = shared_dir / "tokenizers"
    return {"gpt2": t / "gpt2.tokenizer.json", "qwen3": t / "qwen3.tokenizer.json", "phi-3": t / "phi-3"}


@pytest.fixture(scope="module")
def loaded(tok_files):
    """(pairpack tokenizer, independent tokenizers.Tokenizer) per name, loaded once."""
    out = {}
    for name, p in tok_files.items():
        f = p / "tokenizer.json" if p.is_dir() else p
        out[name] = (load_tokenizer(p), tokenizers.Tokenizer.from_file(str(f)))
    return out


def _whole(raw, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def _phi3_render(tok_dir: Path, messages: list[dict], gen: bool) -> str:
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(cfg["chat_template"]).render(messages=messages, add_generation_prompt=gen,
                                                        bos_token="<s>", eos_token="<|endoftext|>")


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@settings(max_examples=12)
@given(user=_TEXT, chosen=_TEXT, rejected=_TEXT)
@example(user="Hi", chosen=" Hello", rejected="\n\nBye")
@example(user="Hi", chosen="  x", rejected=" \n x")
def test_chat_rows_equal_the_whole_rendered_conversation(tmp_path_factory, loaded, tok_files, user, chosen, rejected):
    """Every chat row (prompt + completion) is the model's tokenization of the rendered
    conversation, with no EOS after the template's end of turn: Qwen3 with chatml, Phi-3 with its
    own template from tokenizer_config.json, GPT-2 (no chat markers) with the plain-text hh format."""
    if not (user.strip() and chosen.strip() and rejected.strip()):
        return
    rec = {"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}]}
    for name in ("qwen3", "phi-3", "gpt2"):
        tok, raw = loaded[name]
        out = tmp_path_factory.mktemp("chat") / "ds"
        build([rec], out, tokenizer=tok, workers=1, chat_template="hh" if name == "gpt2" else None)
        ds = pairpack.open(out)
        p = ds[0]
        for completion, stored in ((chosen, p.chosen), (rejected, p.rejected)):
            msgs = rec["prompt"] + [{"role": "assistant", "content": completion}]
            text = (_chatml(msgs) if name == "qwen3" else _phi3_render(tok_files[name], msgs, False) if name == "phi-3"
                    else f"\n\nHuman: {user}\n\nAssistant: {completion}")
            assert p.prompt.tolist() + stored.tolist() == _whole(raw, text), (name, completion)


@settings(max_examples=10)
@given(st.lists(st.tuples(st.sampled_from(["Q: x", "Q: x ", "Assistant:", "a\n", "问 ", "<|im_start|>u\n",
                                           "x<|endoftext|> ", "<|user|>\nq<|end|>\n<|assistant|>"]), _TEXT, _TEXT),
                min_size=1, max_size=6))
@example([("Q: x ", "Hello", " Bye"), ("Assistant:", " No", "\n\nYes")])
def test_boundary_pairs_are_counted_against_the_whole_row(tmp_path_factory, loaded, rows):
    """The report counts exactly the pairs with a row whose stored ids differ from the row's whole
    tokenization (default convention); with --boundary row every row equals it and the same pairs
    are counted."""
    recs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows if c and r]
    if not recs:
        return
    for name, (tok, raw) in loaded.items():
        expect = 0
        d = tmp_path_factory.mktemp("b")
        rep = build(recs, d / "p", tokenizer=tok, workers=1, add_eos=False, add_bos=False)
        rep_row = build(recs, d / "r", tokenizer=tok, workers=1, add_eos=False, add_bos=False, boundary="row")
        ds, ds_row = pairpack.open(d / "p"), pairpack.open(d / "r")
        for i, rec in enumerate(recs):
            whole = [_whole(raw, rec["prompt"] + rec[k]) for k in ("chosen", "rejected")]
            stored = [ds[i].prompt.tolist() + ds[i].chosen.tolist(), ds[i].prompt.tolist() + ds[i].rejected.tolist()]
            expect += stored != whole
            assert ds[i].prompt.tolist() == _whole(raw, rec["prompt"])  # the prompt as tokenized alone
            row = ds_row[i]
            assert [row.prompt.tolist() + row.chosen.tolist(), row.prompt.tolist() + row.rejected.tolist()] == whole
        assert rep.boundary_pairs == expect == rep_row.boundary_pairs, name
        if expect:
            ex = rep.boundary_example
            assert ex["file"] and ex["line"] >= 1 and ex["row"] in ("chosen", "rejected")


def test_summary_and_json_report_count_boundaries(tmp_path, tok_files):
    src = tmp_path / "f.jsonl"
    src.write_text(json.dumps({"prompt": "Q: x ", "chosen": "Hello", "rejected": " Bye"}) + "\n"
                   + json.dumps({"prompt": "Assistant:", "chosen": " No", "rejected": " Yes"}) + "\n")
    r = run_cli("build", src, "-o", tmp_path / "ds", "--tokenizer", tok_files["qwen3"])
    assert r.returncode == 0, r.stderr
    assert "boundaries       1 pair(s) whose rows, tokenized whole, merge tokens" in r.stdout
    assert "f.jsonl:1 chosen: 'Q: x ' + 'Hello'" in r.stdout and "--boundary row" in r.stdout
    r = run_cli("build", src, "-o", tmp_path / "ds2", "--tokenizer", tok_files["qwen3"], "--boundary", "row", "--json")
    rep = json.loads(r.stdout)
    assert rep["boundary"] == "row" and rep["boundary_pairs"] == 1
    ex = rep["boundary_example"]
    assert ex["line"] == 1 and ex["row"] == "chosen" and ex["prompt_end"] == "Q: x " and ex["completion_start"] == "Hello"
    assert pairpack.open(tmp_path / "ds2").manifest.provenance["options"]["boundary"] == "row"
    assert "--boundary" in run_cli("build", "--help").stdout


def test_chat_eos_only_with_add_eos_and_the_summary_says_which(tmp_path, tok_files):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": " Hello",
                               "rejected": "Bye"}) + "\n")
    r = run_cli("build", src, "-o", tmp_path / "a", "--tokenizer", tok_files["qwen3"])
    assert "not added: chat completions end with the template's end of turn (--add-eos adds it)" in r.stdout
    assert pairpack.open(tmp_path / "a")[0].chosen[-1] != pairpack.open(tmp_path / "a").manifest.eos_id
    r = run_cli("build", src, "-o", tmp_path / "b", "--tokenizer", tok_files["qwen3"], "--add-eos")
    assert r.returncode == 0 and "appended to completions" in r.stdout
    assert pairpack.open(tmp_path / "b")[0].chosen[-1] == pairpack.open(tmp_path / "b").manifest.eos_id


_LONG = st.lists(st.sampled_from(["The", " model", "  answer", "\n\nHuman:", " 问题", "\t", " x", ",", "  \n"]),
                 min_size=12, max_size=40).map("".join)


@settings(max_examples=10)
@given(st.lists(st.tuples(_LONG, st.sampled_from(["Q: x", "Q: x ", "Assistant:", "a\n", "问 ", ""]), _TEXT, _TEXT),
                min_size=1, max_size=6))
@example([("The model answer is long enough to be cut somewhere before", "Q: x ", "Hello", " Bye"),
          ("\n\nHuman: what  is\n\nthe answer to the question here", "Assistant:", " No", "\n\nYes")])
def test_long_prompts_cut_for_the_whole_row_still_equal_it(tmp_path_factory, loaded, rows):
    """Long plain-text prompts are encoded from a whitespace run well before their end
    (joins._text_cut): the rows still equal the whole row's tokenization (--boundary row), the
    prompt its own, and the boundary count the independent one."""
    recs = [{"prompt": a + b, "chosen": c, "rejected": r} for a, b, c, r in rows if c and r]
    if not recs:
        return
    for name, (tok, raw) in loaded.items():
        d = tmp_path_factory.mktemp("long")
        rep = build(recs, d / "p", tokenizer=tok, workers=1, add_eos=False, add_bos=False)
        build(recs, d / "r", tokenizer=tok, workers=1, add_eos=False, add_bos=False, boundary="row")
        ds, ds_row = pairpack.open(d / "p"), pairpack.open(d / "r")
        expect = 0
        for i, rec in enumerate(recs):
            whole = [_whole(raw, rec["prompt"] + rec[k]) for k in ("chosen", "rejected")]
            stored = [ds[i].prompt.tolist() + ds[i].chosen.tolist(), ds[i].prompt.tolist() + ds[i].rejected.tolist()]
            expect += stored != whole
            assert ds[i].prompt.tolist() == _whole(raw, rec["prompt"]), name
            row = ds_row[i]
            assert [row.prompt.tolist() + row.chosen.tolist(), row.prompt.tolist() + row.rejected.tolist()] == whole, name
        assert rep.boundary_pairs == expect, name
