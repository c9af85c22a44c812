"""Named chat templates (issue 27): each against the model's own template where the project has
one (Phi-3, ../shared/tokenizers/phi-3) and otherwise against a hand-checked rendering of the
family's published format; markers checked against the tokenizer's vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest

import pairpack
from pairpack.errors import ArgumentError
from pairpack.ingest.build import build
from pairpack.ingest.shapes import ChatRenderer
from pairpack.ingest.templates import NAMED_CHAT_TEMPLATES, families_in_vocabulary

from .conftest import run_cli

S, U, A, U2, A2 = "Be brief.", "Hi there", "Hello! ", "2+2?", "4"
CONV = [{"role": "system", "content": S}, {"role": "user", "content": U}, {"role": "assistant", "content": A},
        {"role": "user", "content": U2}]

# (prompt rendering with the generation prompt, the same conversation with the final reply A2):
# written by hand from each family's published chat_template
HAND = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
               "Hello! <|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "4<|eot_id|>"),
    "llama2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] 2+2? [/INST]", " 4 </s>"),
    "mistral": ("<s>[INST] Be brief.\n\nHi there [/INST]Hello! </s>[INST] 2+2? [/INST]", "4</s>"),
    "phi3": ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello! <|end|>\n"
             "<|user|>\n2+2?<|end|>\n<|assistant|>\n", "4<|end|>\n"),
    "gemma": ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", "4<end_of_turn>\n"),
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello! </s>\n<|user|>\n2+2?</s>\n"
               "<|assistant|>\n", "4</s>\n"),
    "hh": ("\n\nSystem: Be brief.\n\nHuman: Hi there\n\nAssistant: Hello! \n\nHuman: 2+2?\n\nAssistant:", "\n\nAssistant: 4"),
}


def test_every_named_template_has_a_hand_checked_rendering():
    assert set(HAND) == set(NAMED_CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(HAND))
def test_named_template_renders_the_published_format(name):
    r = ChatRenderer(name)
    prompt, reply = HAND[name]
    assert r.render(CONV, True) == prompt
    full = r.render(CONV + [{"role": "assistant", "content": A2}], False)
    if name == "hh":  # no generation prompt in the full transcript: the reply's marker is its own
        assert full == prompt[:-len("\n\nAssistant:")] + reply
    else:
        assert full == prompt + reply
    p, c = r.split(CONV, {"role": "assistant", "content": A2}, "chosen")
    assert p + c == full


@pytest.mark.parametrize("convo", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": " lead space"}, {"role": "assistant", "content": "\nnl"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
])
def test_phi3_named_template_equals_phi3s_own(shared_dir, convo):
    own = ChatRenderer(str(shared_dir / "tokenizers" / "phi-3" / "tokenizer_config.json"), bos_token="<s>",
                       eos_token="<|endoftext|>")
    named = ChatRenderer("phi3")
    assert named.render(convo, True) == own.render(convo, True)
    full = convo + [{"role": "assistant", "content": " reply\n"}]
    assert named.render(full, False) == own.render(full, False)


def test_named_templates_refuse_roles_they_cannot_render():
    with pytest.raises(pairpack.errors.SourceError, match="role 'tool'"):
        ChatRenderer("llama3").render([{"role": "tool", "content": "x"}], True)


def _chat_file(tmp_path, n=3):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f" yes {i}",
                                       "rejected": f"\nno {i}"}) + "\n" for i in range(n)))
    return src


def test_bare_tokenizer_json_names_its_families_and_builds_like_the_model_dir(tmp_path, shared_dir):
    bare = tmp_path / "phi3-bare.json"
    shutil.copyfile(shared_dir / "tokenizers" / "phi-3" / "tokenizer.json", bare)
    src = _chat_file(tmp_path)
    r = run_cli("build", src, "-o", tmp_path / "x", "--tokenizer", bare)
    assert r.returncode == 2 and "families whose markers are tokens of phi3-bare.json: " in r.stderr, r.stderr
    assert "phi3" in r.stderr.split("families whose markers")[1] and "--chat-template" in r.stderr
    assert "llama3" not in r.stderr.split("families whose markers")[1].split(".")[0]
    r = run_cli("build", src, "-o", tmp_path / "named", "--tokenizer", bare, "--chat-template", "phi3")
    assert r.returncode == 0, r.stderr
    build([src], tmp_path / "own", tokenizer=shared_dir / "tokenizers" / "phi-3")
    named, own = pairpack.open(tmp_path / "named"), pairpack.open(tmp_path / "own")
    for i in range(3):
        assert [x.tolist() for x in named[i]] == [x.tolist() for x in own[i]]


def test_default_chatml_names_the_families_in_the_summary(tmp_path, shared_dir):
    r = run_cli("build", _chat_file(tmp_path), "-o", tmp_path / "q", "--tokenizer",
                shared_dir / "tokenizers" / "qwen3.tokenizer.json")
    assert r.returncode == 0, r.stderr
    assert ("template         chat template chatml (the default: qwen3.tokenizer.json has no template of its own; "
            "families whose markers are tokens of qwen3.tokenizer.json: chatml)") in r.stdout


def test_markers_not_in_the_vocabulary_need_an_opt_in(tmp_path, shared_dir):
    gpt2 = shared_dir / "tokenizers" / "gpt2.tokenizer.json"
    src = _chat_file(tmp_path)
    r = run_cli("build", src, "-o", tmp_path / "a", "--tokenizer", gpt2, "--chat-template", "llama3")
    assert r.returncode == 2 and "<|start_header_id|>" in r.stderr and "--markers-as-text" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()
    r = run_cli("build", src, "-o", tmp_path / "b", "--tokenizer", gpt2, "--chat-template", "llama3", "--markers-as-text")
    assert r.returncode == 0, r.stderr
    assert "warning: the llama3 template's markers <|begin_of_text|>, <|start_header_id|>" in r.stdout
    with pytest.raises(ArgumentError, match="not tokens of gpt2.tokenizer.json"):
        build([src], tmp_path / "c", tokenizer=gpt2, chat_template="chatml")
    assert "--markers-as-text" in run_cli("build", "--help").stdout


def test_families_in_vocabulary():
    assert families_in_vocabulary(lambda t: t in ("<|im_start|>", "<|im_end|>", "</s>")) == ["chatml", "zephyr"]
    assert families_in_vocabulary(lambda t: False) == []
