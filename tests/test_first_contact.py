"""What a new user meets first (issue 16) and the chat shapes of issue 13: joins that equal whole
rows for every real tokenizer, model directories, errors that name the fix, builds that say what
they did, and chat records in newer formats."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from pairpack.errors import SourceError, StateError, TokenizerError
from pairpack.ops.export import export
from pairpack.ops.merge import merge
from pairpack.ingest.shapes import FieldSpec, ShapeOptions, detect_shape, make_extractor
from pairpack.ops.show import pair_to_json
from pairpack.tokenization import check_join, decode_rows, encode_continuations, load_tokenizer

from .conftest import SHARED_MISSING, run_cli, write_jsonl

HH = "hh-rlhf_harmless-base_test.jsonl.gz"


def _shared_tokenizers(shared: Path) -> list[Path]:
    d = shared / "tokenizers"
    return sorted(list(d.glob("*.json")) + [p for p in d.iterdir() if (p / "tokenizer.json").is_file()])


@pytest.fixture(scope="module")
def toks(shared_dir):
    """Every tokenizer in ../shared/tokenizers, loaded once."""
    return {p.name: load_tokenizer(p) for p in _shared_tokenizers(shared_dir)}


@pytest.fixture(scope="module")
def phi3(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "phi-3"


# --- joins ---------------------------------------------------------------------------------------
_piece = st.sampled_from(["Assistant:", " No", "No", " ", "  ", "\n", "\n\n", "Hello world", "你好", "。", "1",
                          " 2", "<|endoftext|>", "café", "\t", "?", "Human: hi"])
_text = st.lists(_piece, min_size=1, max_size=6).map("".join)


@given(prompt=_text, completion=_text)
@example(prompt="Assistant:", completion=" No")  # the issue's example: a bare "▁" before "▁No" with Phi-3
@example(prompt="Assistant: ", completion=" No")  # a space run across the join: no boundary there
@example(prompt="\n", completion="\nYes")
@example(prompt="<|endoftext|>", completion="Assistant:")  # Phi-3 starts a new text after a special token
def test_joins_decode_to_the_row_and_equal_it_where_the_boundary_allows(toks, prompt, completion):
    """For every tokenizer in ../shared: prompt ids + completion ids decode like the whole row, and
    equal the whole row's ids unless the row has a token across the join (then check_join says
    "boundary", the pairs the issue asks to report)."""
    for name, tok in toks.items():
        p = list(tok.encode(prompt))
        c = list(encode_continuations(tok, [completion], [p[-1]])[0])
        whole = tok.encode(prompt + completion)
        assert tok.decode(p + c) == tok.decode(whole), name
        assert check_join(tok, prompt, completion) in ("exact", "boundary"), name


def test_phi3_continuation_has_no_stray_marker(phi3, toks):
    t = toks["phi-3"]
    assert t.join_anchor == "\n" and toks["gpt2.tokenizer.json"].join_anchor is None
    assert t.encode(" No").tolist() == [29871, 1939]  # alone: a bare "▁" first
    assert t.encode(" No", continuation=True).tolist() == [1939]
    assert t.encode("Assistant:").tolist() + [1939] == t.encode("Assistant: No").tolist()
    assert t.identity()["join_anchor"] == "\n"


def test_phi3_hh_build_decodes_every_row_to_its_text(tmp_path, shared_dir, phi3):
    rep = build([shared_dir / "data" / HH], tmp_path / "ds", tokenizer=phi3)
    ds = pairpack.open(tmp_path / "ds")
    tok = ds.tokenizer
    recs = [json.loads(x) for x in gzip.open(shared_dir / "data" / HH)]
    assert rep.pairs == len(recs) == 2312
    bos, eos = ds.manifest.bos_id, ds.manifest.eos_id
    for i, r in enumerate(recs):
        p, c, rj = ds[i]
        assert p[0] == bos and c[-1] == eos and rj[-1] == eos  # the config's add_bos_token; EOS by default
        assert tok.decode(np.concatenate([p[1:], c[:-1]])) == r["chosen"], i
        assert tok.decode(np.concatenate([p[1:], rj[:-1]])) == r["rejected"], i


def test_show_and_export_decode_whole_rows(tmp_path, phi3):
    build([{"prompt": "Assistant:", "chosen": " No", "rejected": " Yes"}], tmp_path / "ds", tokenizer=phi3)
    ds = pairpack.open(tmp_path / "ds")
    got = pair_to_json(ds, 0)
    assert got["prompt"]["text"] == "<s> Assistant:"  # the tokenizer's own decoding of BOS + "▁Ass..."
    assert (got["chosen"]["text"], got["rejected"]["text"]) == (" No<|endoftext|>", " Yes<|endoftext|>")
    assert ds.decode(ds[0].chosen) == "No<|endoftext|>"  # a segment alone loses its space: why rows
    out = run_cli("show", tmp_path / "ds", "0")
    assert out.returncode == 0 and "\n No<|endoftext|>" in out.stdout, out.stderr
    export(tmp_path / "ds", tmp_path / "e.jsonl", decode=True)
    rec = json.loads((tmp_path / "e.jsonl").read_text())
    assert rec["prompt_text"] + rec["chosen_text"] == "<s> Assistant: No<|endoftext|>"


# --- model directories -----------------------------------------------------------------------------
def _chat(n: int = 3) -> list[dict]:
    return [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"yes {i}"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"no {i}"}]}
            for i in range(n)]


def test_model_directory_builds_with_its_own_template(tmp_path, phi3):
    src = write_jsonl(tmp_path / "c.jsonl", _chat())
    r = run_cli("build", src, "-o", tmp_path / "ds", "--tokenizer", phi3)
    assert r.returncode == 0, r.stderr
    assert "tokenizer        phi-3 (" in r.stdout and "after '\\n'" in r.stdout
    assert "template         chat template tokenizer_config.json of phi-3" in r.stdout
    assert "BOS              '<s>' (id 1, from tokenizer_config.json), prepended to prompts" in r.stdout
    assert ("EOS              '<|endoftext|>' (id 32000, from tokenizer_config.json), not added: chat completions "
            "end with the template's end of turn (--add-eos adds it)") in r.stdout
    ds = pairpack.open(tmp_path / "ds")
    cfg = json.loads((phi3 / "tokenizer_config.json").read_text())
    opts = ds.manifest.provenance["options"]
    assert opts["chat_template"] == cfg["chat_template"]
    assert opts["chat_template_name"] == "tokenizer_config.json of phi-3"
    assert ds.manifest.tokenizer["name"] == "phi-3" and len(ds.manifest.tokenizer["config_hash"]) == 32
    assert ds.manifest.tokenizer["add_bos_token"] is True and ds[0].prompt[0] == ds.manifest.bos_id == 1
    p, c, rj = decode_rows(ds.tokenizer, *ds[0])
    assert p == "<s><|user|> \nq0<|end|> \n<|assistant|> \n"  # Phi-3's own tokens, decoded by its decoder
    assert c == "yes 0<|end|> \n"
    # chatml only when asked: its markers are plain text to Phi-3
    r = run_cli("build", src, "-o", tmp_path / "ml", "--tokenizer", phi3, "--chat-template", "chatml")
    assert r.returncode == 2 and "markers <|im_start|>, <|im_end|> are not tokens of phi-3" in r.stderr, r.stderr
    r = run_cli("build", src, "-o", tmp_path / "ml", "--tokenizer", phi3, "--chat-template", "chatml",
                "--markers-as-text")
    assert r.returncode == 0 and "template         chat template chatml (warning: " in r.stdout, r.stderr


def test_tokenizer_without_template_must_be_given_one(tmp_path, shared_dir):
    src = write_jsonl(tmp_path / "c.jsonl", _chat())
    gpt2 = shared_dir / "tokenizers" / "gpt2.tokenizer.json"
    r = run_cli("build", src, "-o", tmp_path / "ds", "--tokenizer", gpt2)
    assert r.returncode == 2 and "chat records need a chat template" in r.stderr and "--chat-template" in r.stderr
    assert run_cli("build", src, "-o", tmp_path / "ds", "--tokenizer", gpt2, "--chat-template", "hh").returncode == 0


def test_tokenizer_arguments_that_are_not_tokenizers(tmp_path):
    r = run_cli("build", tmp_path, "-o", tmp_path / "o", "--tokenizer", "gpt2")
    assert r.returncode == 1 and "hub names are not fetched" in r.stderr and "huggingface-cli download gpt2" in r.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(TokenizerError, match="directory has no tokenizer.json .*SentencePiece.*Found: tokenizer.model"):
        load_tokenizer(tmp_path / "model")


# --- errors that lead somewhere --------------------------------------------------------------------
def test_missing_field_lists_keys_and_names_the_flag(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    r = run_cli("build", src, "-o", tmp_path / "o", "--shape", "fields")
    assert r.returncode == 1
    assert (f"{src}:1: field 'prompt': missing field; the record's keys are question, chosen, rejected; "
            "did you mean 'question'? Name the field with --prompt NAME") in r.stderr
    with pytest.raises(SourceError, match=r"keys under 'input' are msgs; did you mean 'input.msgs'\?"):
        make_extractor(ShapeOptions(shape="fields", spec=FieldSpec("input.msg")))(
            {"input": {"msgs": 1}, "chosen": "a", "rejected": "b"})


def test_a_typo_in_prompt_never_switches_to_hh(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    r = run_cli("build", src, "-o", tmp_path / "o", "--prompt", "promt")
    assert r.returncode == 1 and "field 'promt': the prompt field given with --prompt is not in the record" in r.stderr
    assert "did you mean 'prompt'?" in r.stderr and "Assistant" not in r.stderr
    # without --prompt, string-only records are HH, and the summary says why
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}])
    r = run_cli("build", hh, "-o", tmp_path / "h")
    assert r.returncode == 0 and "shape hh (string chosen/rejected and no 'prompt' field: HH transcripts)" in r.stdout
    # a detected hh that finds no marker says how it was detected and which flag to use
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    r = run_cli("build", bad, "-o", tmp_path / "q")
    assert r.returncode == 1 and "The shape hh was detected" in r.stderr and "--prompt NAME" in r.stderr


def test_sharegpt_and_openai_records_are_detected_and_built(tmp_path):
    share = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}],
              "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}}]
    openai = [{"input": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
               "preferred_output": [{"role": "assistant", "content": "hello"}],
               "non_preferred_output": [{"role": "assistant", "content": "go away"}]}]
    reps = {}
    for name, recs in (("share", share), ("openai", openai)):
        reps[name] = build(write_jsonl(tmp_path / f"{name}.jsonl", recs), tmp_path / name)
        assert reps[name].shape == "chat"
    assert reps["share"].shape_reason == "ShareGPT record: prompt from 'conversations'"
    assert reps["openai"].shape_reason.startswith("OpenAI preference record: prompt from 'input.messages'")
    a, b = pairpack.open(tmp_path / "share"), pairpack.open(tmp_path / "openai")
    assert [x.tolist() for x in a[0]] == [x.tolist() for x in b[0]]
    assert a.decode(a[0].prompt).startswith("<|im_start|>system\nbe brief<|im_end|>")
    # a name the user gives is never replaced
    assert detect_shape(openai[0], ShapeOptions(explicit=frozenset({"chosen"}))) is None


def test_json_lines_and_arrays_under_the_wrong_suffix(tmp_path):
    rec = {"prompt": "a", "chosen": "b", "rejected": "c"}
    (tmp_path / "x.json").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "y.jsonl").write_text("[\n " + json.dumps(rec) + "\n]\n")
    (tmp_path / "z.jsonl").write_text(json.dumps([rec, rec]) + "\n")
    for name, msg in (("x.json", "the file looks like JSON Lines (one record per line): name it .jsonl"),
                      ("y.jsonl", "the file looks like a JSON array: name it .json"),
                      ("z.jsonl", "holds a JSON array (2 records), not one record; the file looks like a JSON array")):
        r = run_cli("build", tmp_path / name, "-o", tmp_path / f"o{name}")
        assert r.returncode == 1 and msg in r.stderr, (name, r.stderr)


def test_show_says_why_it_cannot_decode(tmp_path, phi3):
    build([{"prompt": [1, 2], "chosen": [3], "rejected": [4]}], tmp_path / "ids")
    r = run_cli("show", tmp_path / "ids", "0")
    assert r.returncode == 0 and "(tokenizer unknown: the ids were built without a tokenizer: showing ids)" in r.stderr
    build([{"prompt": "a", "chosen": "b", "rejected": "c"}], tmp_path / "hf", tokenizer=phi3)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "tokenizers.py").write_text("raise ImportError('blocked for the test')\n")
    code = (f"import sys; sys.path.insert(0, {str(blocker)!r}); from pairpack.cli import main; "
            f"main(['show', {str(tmp_path / 'hf')!r}, '0'])")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "needs tokenizers, which is not installed: pip install \"pairpack[hf]\"" in out.stderr, out.stderr
    (tmp_path / "hf" / "tokenizer.json").unlink()
    r = run_cli("show", tmp_path / "hf", "0")
    assert "copy of its tokenizer (phi-3) is missing or damaged" in r.stderr


def test_stats_takes_several_lengths_after_one_flag(tmp_path):
    build([{"prompt": [1, 2], "chosen": [3] * 9, "rejected": [4]}], tmp_path / "ds")
    r = run_cli("stats", tmp_path / "ds", "--max-length", "4", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert [t["max_length"] for t in json.loads(r.stdout)["truncation"]] == [4, 8]
    r = run_cli("stats", tmp_path / "ds", "8")
    assert r.returncode == 2 and "candidate lengths follow --max-length" in r.stderr


# --- builds that tell the truth --------------------------------------------------------------------
def test_a_build_that_keeps_no_pair_fails(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "chosen": "b"}] * 3)
    r = run_cli("build", src, "-o", tmp_path / "o", "--skip-invalid")
    assert r.returncode == 1 and not (tmp_path / "o").exists()
    assert "no pair kept: every one of 3 records was rejected (missing_field: 3)" in r.stderr
    assert len((tmp_path / "o.rejects.jsonl").read_text().splitlines()) == 3  # kept, to be read
    (tmp_path / "empty.jsonl").write_text("")
    r = run_cli("build", tmp_path / "empty.jsonl", "-o", tmp_path / "e")
    assert r.returncode == 1 and "the input holds no records" in r.stderr
    assert run_cli("build", tmp_path / "empty.jsonl", "-o", tmp_path / "e", "--allow-empty").returncode == 0


def test_ids_build_says_what_vocabulary_it_guessed(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": [1, 2], "chosen": [70], "rejected": [4]}])
    r = run_cli("build", src, "-o", tmp_path / "o")
    assert "vocab_size guessed as the largest id + 1 (71); pass --vocab-size N" in r.stdout
    assert "vocabulary" not in run_cli("build", src, "-o", tmp_path / "v", "--vocab-size", "100").stdout


def test_exports_rebuild_together_only_when_their_settings_agree(tmp_path, shared_dir):
    recs = [{"prompt": "hello", "chosen": " a", "rejected": " b"}, {"prompt": "x", "chosen": " c", "rejected": " d"}]
    build(recs, tmp_path / "g", tokenizer=shared_dir / "tokenizers" / "gpt2.tokenizer.json")
    build(recs, tmp_path / "b")
    export(tmp_path / "g", tmp_path / "g1.jsonl")
    export(tmp_path / "g", tmp_path / "g2.jsonl")
    export(tmp_path / "b", tmp_path / "b1.jsonl")
    rep = build([tmp_path / "g1.jsonl", tmp_path / "g2.jsonl"], tmp_path / "gg")
    ds = pairpack.open(tmp_path / "gg")
    assert rep.pairs == 4 and ds.manifest.tokenizer["name"] == "gpt2.tokenizer.json"
    with pytest.raises(SourceError, match="exported with other settings"):
        build([tmp_path / "g1.jsonl", tmp_path / "b1.jsonl"], tmp_path / "gb")
    shutil.copy(tmp_path / "g1.jsonl", tmp_path / "bare.jsonl")
    with pytest.raises(SourceError, match="no export sidecar .* pass --tokenizer or --vocab-size"):
        build([tmp_path / "g1.jsonl", tmp_path / "bare.jsonl"], tmp_path / "gx")


def test_columns_keep_numeric_fields(tmp_path):
    recs = [{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 8.5, "score_rejected": 3,
             "meta": {"rating": 4}} for _ in range(3)]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    r = run_cli("build", src, "-o", tmp_path / "o", "--columns", "score_chosen,score_rejected",
                "--columns", "rating=meta.rating:int64")
    assert r.returncode == 0 and "columns          score_chosen (score_chosen, float32)" in r.stdout, r.stderr
    ds = pairpack.open(tmp_path / "o")
    assert ds.column("score_chosen").tolist() == [8.5] * 3 and ds.column("rating").dtype == np.int64
    assert ds.manifest.columns[0].attrs == {"field": "rating"} or ds.column_names == ["rating", "score_chosen",
                                                                                       "score_rejected"]
    # the export carries them, and its rebuild keeps them
    export(tmp_path / "o", tmp_path / "e.jsonl")
    again = pairpack.open(build([tmp_path / "e.jsonl"], tmp_path / "again").output)
    assert again.column("score_rejected").tolist() == [3.0] * 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**recs[0], "score_chosen": "high"}])
    with pytest.raises(SourceError, match="column 'score_chosen' needs a number, got str") as e:
        build([bad], tmp_path / "b", columns=["score_chosen"])
    assert (e.value.reason, e.value.field) == ("bad_column", "score_chosen")
    with pytest.raises(SourceError, match="kept as column 'x' by --columns"):
        build([src], tmp_path / "m", columns=["x"])


def test_merge_accepts_parts_of_different_shapes(tmp_path):
    hh = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    fields = [{"question": "q", "good": "x", "bad": "y"}]
    build(hh, tmp_path / "hh")
    build(fields, tmp_path / "f", prompt="question", chosen="good", rejected="bad")
    rep = merge([tmp_path / "hh", tmp_path / "f"], tmp_path / "m")
    ds = pairpack.open(tmp_path / "m")
    assert len(ds) == 2 and ds.verify() == [] and "different record options" in rep.summary()
    assert [m["options"]["shape"] for m in ds.manifest.provenance["merged_from"]] == ["hh", "fields"]
    build(fields, tmp_path / "bos", prompt="question", chosen="good", rejected="bad", add_bos=True)
    with pytest.raises(StateError, match="'add_bos' .* parts must add BOS/EOS alike"):
        merge([tmp_path / "f", tmp_path / "bos"], tmp_path / "m2")


def test_build_info_and_verify_print_the_same_size(tmp_path, sample_json):
    b = run_cli("build", sample_json, "-o", tmp_path / "ds")
    i, v = run_cli("info", tmp_path / "ds"), run_cli("verify", tmp_path / "ds")
    sizes = [re.search(pat, x.stdout, re.M).group(1) for pat, x in
             ((r"^  dataset size +([\d,.]+ MB)$", b), (r"^size +([\d,.]+ MB)$", i), (r"OK \(1,100 pairs, ([\d,.]+ MB)", v))]
    assert len(set(sizes)) == 1, sizes


def test_skips_for_want_of_shared_say_what_it_is():
    assert "tokenizers" in SHARED_MISSING and "PROVENANCE.md" in SHARED_MISSING and "beside the checkout" in SHARED_MISSING


# --- issue 13: chat shapes still refused ----------------------------------------------------------
def test_value_text_parts_are_accepted():
    rec = {"prompt": [{"role": "user", "content": [{"type": "text", "value": "hi "}, {"type": "text", "text": "there"}]}],
           "chosen": "a", "rejected": "b"}
    p, _, _ = make_extractor(ShapeOptions(shape="chat"))(rec)
    assert p == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    rec["prompt"][0]["content"] = [{"type": "text", "val": "x"}]
    with pytest.raises(SourceError, match="text content part 0 has no 'text' \\(or 'value'\\) string; its keys are type, val"):
        make_extractor(ShapeOptions(shape="chat"))(rec)


# DeepSeek-R1 style: the generation prompt opens a think block that the rendered reply does not have
R1 = ("{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% else %}<|Assistant|>"
      "{{ m['content'] }}<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def test_non_prefix_templates_split_at_the_common_prefix_and_are_counted(tmp_path):
    (tmp_path / "r1.jinja").write_text(R1)
    src = write_jsonl(tmp_path / "c.jsonl", _chat(4))
    r = run_cli("build", src, "-o", tmp_path / "ds", "--chat-template", tmp_path / "r1.jinja")
    assert r.returncode == 0 and "chat splits      4 record(s)" in r.stdout, r.stderr
    ds = pairpack.open(tmp_path / "ds")
    assert [ds.decode(x) for x in ds[1]] == ["<|User|>q1<|Assistant|>", "yes 1<|end|>", "no 1<|end|>"]
    r = run_cli("build", src, "-o", tmp_path / "strict", "--chat-template", tmp_path / "r1.jinja",
                "--strict-chat-template")
    assert r.returncode == 1 and "not a strict prefix" in r.stderr and "--strict-chat-template" in r.stderr


TOOLS = ("{% if tools %}[tools {{ tools | map(attribute='name') | join(',') }}]{% endif %}"
         "{% if enable_thinking is defined and not enable_thinking %}[no think]{% endif %}"
         "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_tools_and_template_arguments_reach_jinja_templates(tmp_path):
    (tmp_path / "t.jinja").write_text(TOOLS)
    recs = [{**r, "tools": [{"name": "search"}, {"name": "calc"}]} for r in _chat(1)]
    recs.append({**_chat(1)[0], "chat_template_kwargs": {"enable_thinking": True}})
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    r = run_cli("build", src, "-o", tmp_path / "ds", "--chat-template", tmp_path / "t.jinja",
                "--template-arg", "enable_thinking=false")
    assert r.returncode == 0, r.stderr
    ds = pairpack.open(tmp_path / "ds")
    assert ds.decode(ds[0].prompt) == "[tools search,calc][no think]<user>q0</><assistant>"
    assert ds.decode(ds[1].prompt) == "<user>q0</><assistant>"  # the record's kwargs win
    assert ds.manifest.provenance["options"]["template_args"] == {"enable_thinking": False}
    with pytest.raises(SourceError, match="the built-in chatml template cannot render") as e:
        build(recs[:1], tmp_path / "ml")
    assert e.value.field == "tools"
