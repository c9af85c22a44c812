"""Errors that see the whole record (issue 27): every missing field in one error with the record's
keys, the flags that fix them and suggestions (nested paths included); CLI messages name CLI flags;
a file of another shape names the file the shape was detected from."""

from __future__ import annotations

import json

import pytest

from pairpack.errors import SourceError
from pairpack.ingest.build import build

from .conftest import run_cli


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_missing_field_in_one_error_with_flags_and_role_names(tmp_path):
    """torchtune's stack-exchange layout: one run names all three flags, with the fields to pass."""
    src = _jsonl(tmp_path / "se.jsonl", {"qid": 1, "question": "q", "response_j": "good", "response_k": "bad"})
    r = run_cli("build", src, "-o", tmp_path / "o")
    assert r.returncode == 1
    assert "se.jsonl:1: field 'prompt': missing fields 'prompt', 'chosen', 'rejected'" in r.stderr, r.stderr
    assert "the record's keys are qid, question, response_j, response_k" in r.stderr
    assert "name them with --prompt question --chosen response_j --rejected response_k" in r.stderr
    r = run_cli("build", src, "-o", tmp_path / "o", "--prompt", "question", "--chosen", "response_j",
                "--rejected", "response_k")
    assert r.returncode == 0, r.stderr


def test_two_missing_fields_and_similar_names(tmp_path):
    with pytest.raises(SourceError) as e:
        build([{"promt": "q", "chosen": "a", "rejectd": "b"}], tmp_path / "o", shape="fields")
    msg = str(e.value)
    assert "missing fields 'prompt', 'rejected'" in msg and "--prompt promt --rejected rejectd" in msg
    assert e.value.field == "prompt" and e.value.reason == "missing_field"


def test_columns_suggest_nested_paths(tmp_path):
    """UltraFeedback keeps scores under metadata: --columns score_chosen points there, not at chosen."""
    src = _jsonl(tmp_path / "uf.jsonl", {"prompt": "p", "chosen": "c", "rejected": "r",
                                         "metadata": {"score_chosen": 8.0, "score_rejected": 3.0}})
    r = run_cli("build", src, "-o", tmp_path / "o", "--columns", "score_chosen")
    assert r.returncode == 1
    assert "field 'score_chosen': missing field (kept as column 'score_chosen' by --columns)" in r.stderr
    assert "did you mean 'metadata.score_chosen'? Name the field with --columns NAME" in r.stderr, r.stderr
    r = run_cli("build", src, "-o", tmp_path / "o", "--columns", "score_chosen=metadata.score_chosen")
    assert r.returncode == 0, r.stderr


def test_chat_and_hh_records_name_both_missing_completions(tmp_path):
    with pytest.raises(SourceError, match="missing fields 'chosen', 'rejected'"):
        build([{"prompt": [{"role": "user", "content": "q"}], "good": "a"}], tmp_path / "o", shape="chat")
    with pytest.raises(SourceError, match="missing fields 'chosen', 'rejected'"):
        build([{"text": "x"}], tmp_path / "o", shape="hh")


def test_prompt_template_fields_and_completions_at_once(tmp_path):
    with pytest.raises(SourceError) as e:
        build([{"instr": "q", "chosen": "a"}], tmp_path / "o", prompt_template="{instruction}[[ {input}]]")
    msg = str(e.value)
    assert "missing fields 'instruction', 'rejected'" in msg
    assert "--prompt-template instr" in msg and "--rejected NAME" in msg


def test_cli_messages_name_cli_flags(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("build", empty, "-o", tmp_path / "o")
    assert r.returncode == 1 and "the input holds no records (--allow-empty writes an empty dataset" in r.stderr
    assert "allow_empty=True" not in r.stderr.split("(")[1].split(";")[0]
    with pytest.raises(Exception, match="--pairs best-worst reads multi-completion records; it cannot be combined "
                                        "with --shape fields"):
        build([{"prompt": "a", "chosen": "b", "rejected": "c"}], tmp_path / "o", pairs="best-worst", shape="fields")


def test_later_file_of_another_shape_names_where_the_shape_came_from(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    _jsonl(d / "a.jsonl", {"prompt": "p", "chosen": "c", "rejected": "r"})
    _jsonl(d / "b.jsonl", {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"})
    r = run_cli("build", d, "-o", tmp_path / "o")
    assert r.returncode == 1
    assert "b.jsonl:1: field 'prompt': missing field" in r.stderr
    assert "The shape fields and text mode were detected from the first records of a.jsonl" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    # the file the shape came from is not blamed on itself
    _jsonl(d / "a.jsonl", {"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"})
    (d / "b.jsonl").unlink()
    r = run_cli("build", d, "-o", tmp_path / "o")
    assert r.returncode == 1 and "a.jsonl:2" in r.stderr and "were detected from" not in r.stderr
