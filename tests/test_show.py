"""pairpack show: colors on a terminal only, token counts, --ids, --json, negative indices."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import pairpack
from pairpack.cli import main
from pairpack.ops.show import pair_to_json, render_pair, use_color

from .conftest import run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*m")
DIM, GREEN, RED = "\x1b[2m", "\x1b[32m", "\x1b[31m"


@pytest.fixture(scope="module")
def sample_ds(sample_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("show") / "sample"
    pairpack.build([sample_json], out, prompt="instruction")
    return out


@pytest.fixture(scope="module")
def ids_ds(tmp_path_factory) -> Path:
    """A dataset without a tokenizer, with a per-pair column."""
    out = tmp_path_factory.mktemp("show") / "ids"
    with pairpack.Writer(out, vocab_size=100, pad_id=0, columns={"score": "float32"}) as w:
        w.add([5, 6, 7], [8, 9], [10], score=0.5)
        w.add([5, 6, 7], [11], [12, 13, 14], score=-1.0)
    return out


def _segments(text: str) -> dict[str, tuple[str, str]]:
    """{segment: (header line, body)} from show's text output."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"── (prompt|chosen|rejected) \(", ANSI.sub("", line))
        if m:
            out[m.group(1)] = (ANSI.sub("", line), lines[i + 1])
    return out


def test_plain_text_has_counts_and_no_escapes(sample_ds):
    ds = pairpack.open(sample_ds)
    text = render_pair(ds, 0, color=False)
    assert "\x1b" not in text
    seg = _segments(text)
    q = ds[0]
    for name, arr in zip(("prompt", "chosen", "rejected"), q):
        assert seg[name][0] == f"── {name} ({arr.size:,} tokens)"
        assert seg[name][1] == ds.decode(arr)
    assert text.splitlines()[0].startswith(f"pair 0 of {len(ds):,}:")
    assert f"prompt+chosen {q.prompt.size + q.chosen.size:,}" in text


def test_color_text_styles_each_segment(sample_ds):
    ds = pairpack.open(sample_ds)
    text = render_pair(ds, 3, color=True)
    seg = _segments(text)
    assert seg["prompt"][1].startswith(DIM)
    assert seg["chosen"][1].startswith(GREEN)
    assert seg["rejected"][1].startswith(RED)
    assert ANSI.sub("", text) == render_pair(ds, 3, color=False)  # same text, only styles added


def test_use_color_rules(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(None, Tty()) is True
    assert use_color(None, io.StringIO()) is False
    assert use_color(False, Tty()) is False and use_color(True, io.StringIO()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(None, Tty()) is False


def test_cli_piped_is_plain_and_color_flag_forces(sample_ds):
    r = run_cli("show", sample_ds, "0")  # stdout is a pipe
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "── chosen (" in r.stdout
    r = run_cli("show", sample_ds, "0", "--color")
    assert GREEN in r.stdout and RED in r.stdout and DIM in r.stdout


def test_cli_runner_color_paths(sample_ds):
    runner = CliRunner()
    res = runner.invoke(main, ["show", str(sample_ds), "1"], color=True)  # not a tty: auto stays plain
    assert res.exit_code == 0 and "\x1b" not in res.output
    res = runner.invoke(main, ["show", str(sample_ds), "1", "--color"], color=True)
    assert res.exit_code == 0 and GREEN in res.output
    res = runner.invoke(main, ["show", str(sample_ds), "1", "--no-color"], color=True)
    assert res.exit_code == 0 and "\x1b" not in res.output


def test_negative_index_ids_and_json(ids_ds):
    ds = pairpack.open(ids_ds)
    r = run_cli("show", ids_ds, "-1", "--ids")
    assert r.returncode == 0, r.stderr
    seg = _segments(r.stdout)
    assert seg["rejected"] == ("── rejected (3 tokens)", "12 13 14")
    assert r.stdout.startswith("pair 1 of 2:") and "score=-1.0" in r.stdout
    r = run_cli("show", ids_ds, "0")  # no tokenizer: ids, with a note on stderr
    assert "8 9" in r.stdout and "tokenizer unknown" in r.stderr
    r = run_cli("show", ids_ds, "-2", "--json")
    out = json.loads(r.stdout)
    assert out == pair_to_json(ds, 0)
    assert out["index"] == 0 and out["chosen"] == {"length": 2, "ids": [8, 9]} and out["columns"] == {"score": 0.5}


def test_json_has_text_when_decodable(sample_ds):
    r = run_cli("show", sample_ds, "2", "--json")
    out = json.loads(r.stdout)
    ds = pairpack.open(sample_ds)
    assert out["chosen"]["text"] == ds.decode(ds[2].chosen) and out["chosen"]["length"] == ds[2].chosen.size


@pytest.mark.parametrize("index", ["2", "-3"])
def test_out_of_range_is_a_usage_error(ids_ds, index):
    r = run_cli("show", ids_ds, index)
    assert r.returncode == 2 and "out of range" in r.stderr
