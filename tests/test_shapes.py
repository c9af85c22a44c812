"""Record shapes: HH transcripts, chat messages (three dialects, templates), prompt templates,
shape detection, and one test per invalid-record class with its message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import pairpack
from pairpack.ingest.build import build
from pairpack.errors import SourceError
from pairpack.ingest.shapes import (
    ALPACA_TEMPLATE,
    CHAT_SPLIT_NOTE,
    ChatRenderer,
    FieldSpec,
    PromptTemplate,
    ShapeOptions,
    chat_messages,
    detect_shape,
    make_extractor,
    normalize_message,
    split_hh,
)

from .conftest import run_cli

# --- HH -----------------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
_turn_text = _text.filter(lambda t: "\n\nAssistant:" not in t and "\n\nHuman:" not in t)


def _transcript(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)


@given(shared=st.lists(st.tuples(_turn_text, _turn_text), max_size=3), last_h=_turn_text,
       tail_c=st.lists(st.tuples(_turn_text, _turn_text), max_size=2),
       tail_r=st.lists(st.tuples(_turn_text, _turn_text), max_size=2), a_c=_turn_text, a_r=_turn_text)
@example(shared=[], last_h="x", tail_c=[], tail_r=[], a_c="same", a_r="same")
@example(shared=[], last_h="x", tail_c=[], tail_r=[], a_c="ab", a_r="a")
def test_hh_split_round_trips_exactly(shared, last_h, tail_c, tail_r, a_c, a_r):
    """prompt + completion == original on both sides; the prompt ends with the marker and lies in
    the common prefix; when only the final answer differs, the prompt is everything before it."""
    chosen = _transcript(shared) + f"\n\nHuman: {last_h}\n\nAssistant:" + " " + a_c + _transcript(tail_c)
    rejected = _transcript(shared) + f"\n\nHuman: {last_h}\n\nAssistant:" + " " + a_r + _transcript(tail_r)
    try:
        p, c, r = split_hh(chosen, rejected)
    except SourceError as e:  # identical transcripts still split; only empty remainders fail
        assert e.reason == "empty"
        return
    assert p + c == chosen and p + r == rejected
    assert p.endswith("\n\nAssistant:") and c and r
    assert chosen.startswith(p) and rejected.startswith(p)
    if not tail_c and not tail_r and not a_c.startswith(a_r) and not a_r.startswith(a_c):
        assert p == _transcript(shared) + f"\n\nHuman: {last_h}\n\nAssistant:"


def test_hh_real_data_and_the_five_divergent_records(shared_dir):
    recs = [json.loads(x) for x in gzip.open(shared_dir / "data" / "hh-rlhf_harmless-base_test.jsonl.gz")]
    assert len(recs) == 2312
    divergent = []
    for i, rec in enumerate(recs):
        p, c, r = split_hh(rec["chosen"], rec["rejected"])
        assert p + c == rec["chosen"] and p + r == rec["rejected"]
        m = "\n\nAssistant:"
        if rec["chosen"][:rec["chosen"].rfind(m)] != rec["rejected"][:rec["rejected"].rfind(m)]:
            divergent.append(i)
            # the completion spans several turns on at least one side
            assert (m in c) or (m in r)
    assert divergent == [1254, 1688, 1950, 1952, 2036]  # PROVENANCE.md


def test_hh_invalid_records_messages():
    with pytest.raises(SourceError, match="no assistant marker") as e:
        split_hh("\n\nHuman: a", "\n\nHuman: b")
    assert e.value.reason == "hh_no_marker"
    with pytest.raises(SourceError, match="empty") as e:
        split_hh("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b")
    assert e.value.reason == "empty"
    # a marker only in the diverging part does not count
    with pytest.raises(SourceError, match="no assistant marker"):
        split_hh("X\n\nAssistant: a", "Y\n\nAssistant: a")


def test_hh_custom_marker():
    p, c, r = split_hh("USER: hi\nBOT: yes", "USER: hi\nBOT: no", marker="\nBOT:")
    assert (p, c, r) == ("USER: hi\nBOT:", " yes", " no")


# --- chat -----------------------------------------------------------------------------------------
_roles = st.sampled_from(["user", "assistant", "system"])
_msg = st.tuples(_roles, _text)


def _dialect(role: str, text: str, how: int) -> dict:
    if how == 0:
        return {"role": role, "content": text}
    if how == 1:
        return {"from": {"user": "human", "assistant": "gpt", "system": "system"}[role], "value": text}
    half = len(text) // 2
    return {"role": role, "content": [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]}


@given(history=st.lists(_msg, min_size=1, max_size=5), final_c=_text, final_r=_text,
       how=st.integers(0, 2), template=st.sampled_from(["chatml", "hh"]), full=st.booleans())
def test_chat_prompt_holds_every_earlier_turn_and_completion_only_the_last(history, final_c, final_r, how,
                                                                           template, full):
    msgs = [_dialect(r, t, how) for r, t in history]
    if full:
        rec = {"chosen": msgs + [_dialect("assistant", final_c, how)],
               "rejected": msgs + [_dialect("assistant", final_r, how)]}
    else:
        rec = {"prompt": msgs, "chosen": _dialect("assistant", final_c, how), "rejected": final_r}
    ex = make_extractor(ShapeOptions(shape="chat", chat_template=template))
    p, c, r = ex(rec)
    ren = ChatRenderer(template)
    plain = [{"role": ro, "content": t} for ro, t in history]
    assert p == ren.render(plain, True)  # every earlier turn, in order, then the assistant header
    assert p + c == ren.render(plain + [{"role": "assistant", "content": final_c}], False)
    assert p + r == ren.render(plain + [{"role": "assistant", "content": final_r}], False)
    if template == "chatml":
        assert p.endswith("<|im_start|>assistant\n") and c == final_c + "<|im_end|>\n"
    else:
        assert p.endswith("\n\nAssistant:") and c == " " + final_c


def test_three_dialects_render_the_same():
    a = {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": {"role": "assistant", "content": "go"}}
    b = {"prompt": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}],
         "chosen": {"from": "gpt", "value": "hello"}, "rejected": "go"}
    c = {"prompt": [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "nice"}]},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "hello"}]}],
         "rejected": [{"role": "assistant", "content": "go"}]}
    ex = make_extractor(ShapeOptions(shape="chat"))
    assert ex(a) == ex(b) == ex(c)
    assert ex(a)[0] == "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_jinja_template_file_and_tokenizer_config(tmp_path):
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML_JINJA)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": CHATML_JINJA}))
    rec = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    want = make_extractor(ShapeOptions(shape="chat"))(rec)
    assert make_extractor(ShapeOptions(shape="chat", chat_template=str(f)))(rec) == want
    assert make_extractor(ShapeOptions(shape="chat", chat_template=str(cfg)))(rec) == want
    # a template whose prompt is not a prefix of the full rendering is split at the common prefix
    # (as TRL does), or refused with strict_chat_template
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}")
    got = make_extractor(ShapeOptions(shape="chat", chat_template=str(bad)))(rec)
    assert tuple(got) == ("q", "a", "b") and got.note == CHAT_SPLIT_NOTE
    with pytest.raises(SourceError, match="not a strict prefix") as e:
        make_extractor(ShapeOptions(shape="chat", chat_template=str(bad), strict_chat_template=True))(rec)
    assert e.value.reason == "chat_template"


def test_chat_build_with_real_qwen3_tokenizer_ends_prompt_with_header(tmp_path, shared_dir):
    src = tmp_path / "c.jsonl"
    recs = [{"chosen": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "好的。"}],
             "rejected": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "不。"}]}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    build([src], tmp_path / "ds", tokenizer=shared_dir / "tokenizers" / "qwen3.tokenizer.json")
    ds = pairpack.open(tmp_path / "ds")
    assert ds.manifest.token_dtype == "uint32"
    p = ds[0]
    assert ds.decode(p.prompt) == "<|im_start|>user\n写一首诗<|im_end|>\n<|im_start|>assistant\n"
    # the template's end of turn closes a chat completion: no EOS after it unless asked (as TRL)
    assert ds.decode(p.chosen) == "好的。<|im_end|>\n"
    build([src], tmp_path / "eos", tokenizer=shared_dir / "tokenizers" / "qwen3.tokenizer.json", add_eos=True)
    assert pairpack.open(tmp_path / "eos").decode(pairpack.open(tmp_path / "eos")[0].chosen) == \
        "好的。<|im_end|>\n<|endoftext|>"
    assert p.prompt[-3:].tolist()[0] == 151644  # <|im_start|> is one added token, not text


# --- prompt templates ------------------------------------------------------------------------------
def test_alpaca_template_empty_input_leaves_no_dangling_separator():
    t = PromptTemplate("alpaca")
    assert t.source == ALPACA_TEMPLATE
    no_in = t.render({"instruction": "Say hi.", "input": ""})
    with_in = t.render({"instruction": "Say hi.", "input": "to Bob"})
    assert no_in == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert with_in == no_in.replace("Say hi.\n\n", "Say hi.\n\n### Input:\nto Bob\n\n")
    assert t.render({"instruction": "Say hi."}) == no_in  # a missing optional field drops its block too


def test_template_syntax_and_fields():
    t = PromptTemplate("{a.b}: {{literal}} {n}[[ ({opt})]]")
    assert t.render({"a": {"b": "x"}, "n": 3}) == "x: {literal} 3"
    assert t.render({"a": {"b": "x"}, "n": 3, "opt": "o"}) == "x: {literal} 3 (o)"
    with pytest.raises(SourceError, match="missing field") as e:
        t.render({"n": 1})
    assert e.value.field == "a.b" and e.value.reason == "missing_field"
    with pytest.raises(SourceError, match="string or number") as e:
        t.render({"a": {"b": ["list"]}, "n": 1})
    assert e.value.reason == "wrong_type"
    for bad in ("{unclosed", "a } b", "[[ {x}", "[[ [[ {x} ]] ]]", "{}"):
        with pytest.raises(ValueError, match="prompt template"):
            PromptTemplate(bad)


def test_sample_builds_with_alpaca_prompt(tmp_path, sample_json):
    """The bundled sample is detected as Alpaca and built with the book's prompt format."""
    records = json.loads(sample_json.read_text())
    rep = build([sample_json], tmp_path / "ds")
    assert rep.shape == "template" and rep.pairs == 1100
    ds = pairpack.open(tmp_path / "ds")
    assert ds.manifest.provenance["options"]["prompt_template"] == "alpaca"
    empty = [i for i, r in enumerate(records) if r["input"] == ""]
    assert len(empty) == 775  # PROVENANCE.md
    for i in (empty[0], next(i for i, r in enumerate(records) if r["input"])):
        r = records[i]
        text = ds.decode(ds[i].prompt)
        assert text == PromptTemplate("alpaca").render(r)
        assert ("### Input:" in text) == bool(r["input"])
        assert ds.decode(ds[i].chosen) == r["chosen"] + "<eos>"
    # the CLI flag gives the same dataset
    out = run_cli("build", sample_json, "-o", tmp_path / "cli", "--prompt-template", "alpaca")
    assert out.returncode == 0, out.stderr
    assert pairpack.open(tmp_path / "cli").fingerprint == ds.fingerprint
    # an explicit template typed with \n escapes on the command line
    out = run_cli("build", sample_json, "-o", tmp_path / "plain", "--prompt-template", r"{instruction}[[\n\n{input}]]")
    assert out.returncode == 0, out.stderr
    d2 = pairpack.open(tmp_path / "plain")
    assert d2.decode(d2[empty[0]].prompt) == records[empty[0]]["instruction"]


# --- detection ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rec, shape", [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "fields"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, "fields"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh"),
    ({"chosen": [{"role": "assistant", "content": "x"}], "rejected": "y", "prompt": "q"}, "chat"),
    ({"prompt": [{"from": "human", "value": "q"}], "chosen": "x", "rejected": "y"}, "chat"),
    ({"instruction": "i", "input": "", "chosen": "c", "rejected": "r"}, "template"),
])
def test_detect_shape(rec, shape):
    assert detect_shape(rec, ShapeOptions()).shape == shape
    assert detect_shape("not a dict", ShapeOptions()) is None
    assert detect_shape(rec, ShapeOptions(shape="fields")).shape == "fields"  # forcing wins


def test_shape_options_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeOptions(shape="nope")
    with pytest.raises(ValueError, match="prompt template"):
        ShapeOptions(shape="template")


# --- every invalid-record class, through the build, with its message --------------------------------
HH = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
INVALID = [
    # (good record, bad line text, build kwargs, reason, message part, field)
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, '{"prompt": "p", "chosen": ', {}, "malformed_json",
     "malformed JSON", None),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}, {}, "missing_field",
     "missing field", "rejected"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": 5, "rejected": "r"}, {},
     "wrong_type", "must be a string or a list of token ids", "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, ["a list"], {}, "wrong_type", "record must be a JSON object", None),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": [2.5], "rejected": [3]}, {},
     "bad_id", "token ids must be integers", "chosen"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": [2, True], "rejected": [3]}, {},
     "bad_id", "token ids must be integers, found True", "chosen"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": ["2"], "rejected": [3]}, {},
     "bad_id", "token ids must be integers, found '2'", "chosen"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [-1], "chosen": [2], "rejected": [3]}, {},
     "id_range", "negative token id", "prompt"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": [2], "rejected": [300]},
     {"vocab_size": 100}, "id_range", "token id 300 >= vocab_size 100", "rejected"),
    ({"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": [], "rejected": [3]}, {},
     "empty", "segment is empty", "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "", "chosen": "c", "rejected": "r"}, {},
     "empty", "segment is empty", "prompt"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": [1], "chosen": [2], "rejected": [3]}, {},
     "mixed_types", "this build reads text", None),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": [2], "rejected": "r"}, {},
     "mixed_types", "mixes text and token ids", None),
    (HH, {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, {}, "hh_no_marker", "no assistant marker", "chosen"),
    (HH, {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: x"}, {}, "empty",
     "completion after the last shared assistant marker is empty", "chosen"),
    (HH, {"chosen": 1, "rejected": "x"}, {}, "wrong_type", "hh transcripts must be strings", "chosen"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"},
                 {"role": "assistant", "content": "a2"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "x"},
                   {"role": "assistant", "content": "b2"}]},
     {}, "chat_diverged", "differ before their final assistant turn", "chosen"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
     {}, "chat_no_assistant", "last message must be an assistant turn", "chosen"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"},
     {}, "chat_message", "unknown message role 'wizard'", "prompt.0"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"prompt": [{"role": "user", "content": [{"type": "image", "url": "x"}]}], "chosen": "a", "rejected": "b"},
     {}, "chat_content", "has type 'image': only text parts are supported", "prompt.0"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     {}, "chat_message", "needs role/content", "prompt.0"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     {"prompt": [{"role": "user", "content": "boom"}], "chosen": "a", "rejected": "b"},
     {"chat_template": "{% if messages[0]['content'] == 'boom' %}{{ raise_exception('no way') }}{% endif %}"
                       + CHATML_JINJA}, "chat_template", "chat template failed: ValueError: no way", "chosen"),
    ({"instruction": "i", "input": "", "chosen": "c", "rejected": "r"}, {"input": "x", "chosen": "c", "rejected": "r"},
     {}, "missing_field", "used by the prompt template", "instruction"),
]


@pytest.mark.parametrize("good, bad, kwargs, reason, message, field", INVALID,
                         ids=[f"{r}-{i}" for i, (_, _, _, r, _, _) in enumerate(INVALID)])
def test_each_invalid_record_class(tmp_path, good, bad, kwargs, reason, message, field):
    src = tmp_path / "in.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    src.write_text(json.dumps(good) + "\n" + bad_line + "\n" + json.dumps(good) + "\n")
    with pytest.raises(SourceError) as e:
        build([src], tmp_path / "ds", **kwargs)
    err = e.value
    assert (err.reason, err.line, err.field) == (reason, 2, field), str(err)
    assert message in str(err) and f"{src}:2" in str(err)
    assert not (tmp_path / "ds").exists()
    rep = build([src], tmp_path / "ds", skip_invalid=True, **kwargs)
    assert rep.pairs == 2 and dict(rep.rejected) == {reason: 1}
    rej = [json.loads(x) for x in Path(rep.rejects_file).read_text().splitlines()]
    assert [(r["line"], r["reason"], r["field"]) for r in rej] == [(2, reason, field)]
    assert message in rej[0]["message"]


def test_cli_reports_invalid_record_with_file_line_field(tmp_path):
    src = tmp_path / "hh.jsonl"
    src.write_text(json.dumps(HH) + "\n" + json.dumps({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}) + "\n")
    out = run_cli("build", src, "-o", tmp_path / "ds")
    assert out.returncode == 1
    assert f"{src}:2: field 'chosen': no assistant marker" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "ds").exists()


def test_chat_messages_prompt_field_ignored_for_full_conversations():
    rec = {"prompt": "ignored", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    prompt, c, r = chat_messages(rec, FieldSpec())
    assert prompt == [{"role": "user", "content": "q"}] and c["content"] == "a" and r["content"] == "b"
    assert normalize_message({"from": "gpt", "value": "x"}, "f") == {"role": "assistant", "content": "x"}


def test_bad_text_class_from_python_records(tmp_path):
    """A lone surrogate cannot come through orjson (malformed_json there), but can from Python."""
    recs = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "\ud800", "chosen": "c", "rejected": "r"}]
    with pytest.raises(SourceError, match="not valid Unicode") as e:
        build(recs, tmp_path / "ds")
    assert (e.value.reason, e.value.line, e.value.field) == ("bad_text", 2, "prompt")
    rep = build(recs, tmp_path / "ds", skip_invalid=True)
    assert rep.pairs == 1 and dict(rep.rejected) == {"bad_text": 1}
