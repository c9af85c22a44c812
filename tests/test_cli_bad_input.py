"""The bad-input table (README) as subprocess tests of the `pairpack` CLI (issues 2 and 6).

Input side (`pairpack build`): each class of bad record stops the build with one line naming
file, line and field, exit 1, and nothing left behind; with ``--skip-invalid`` the record goes
to ``<out>.rejects.jsonl`` with its reason and the summary counts it. Dataset side
(`info`/`show`/`verify`): damaged, truncated, mismatched or foreign datasets give one clear
line (``verify``: a report naming every problem) and exit 1; nothing is modified. No command
prints a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import pairpack
from pairpack import format as fmt
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
GOOD = '{"prompt": [1, 2], "chosen": [3], "rejected": [4]}'


def cli(*args):
    r = run_cli(*args, cwd=ROOT)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# (class, bad second line (bytes), extra build options, error after "file:2: ", rejects reason)
RECORD_CLASSES = [
    ("malformed line", b'{"prompt": [1,', [], r"malformed JSON \(.+\)", "malformed_json", None),
    ("missing field", b'{"prompt": [1], "chosen": [2]}', [], r"field 'rejected': missing field; the record's keys are prompt, chosen; name the field with --rejected NAME",
     "missing_field",
     "rejected"),
    ("wrong type", b'{"prompt": [1], "chosen": 5, "rejected": [4]}', [],
     r"field 'chosen': must be a string or a list of token ids, got int", "wrong_type", "chosen"),
    ("non-integer id", b'{"prompt": [1], "chosen": [2.5], "rejected": [4]}', [],
     r"field 'chosen': token ids must be integers, found 2\.5", "bad_id", "chosen"),
    ("not an object", b'[1, 2, 3]', [], r"record must be a JSON object, got list", "wrong_type", None),
    ("negative id", b'{"prompt": [1], "chosen": [-3], "rejected": [4]}', [],
     r"field 'chosen': negative token id -3", "id_range", "chosen"),
    ("id >= vocab", b'{"prompt": [1], "chosen": [2], "rejected": [10]}', ["--vocab-size", "10"],
     r"field 'rejected': token id 10 >= vocab_size 10", "id_range", "rejected"),
    ("empty prompt", b'{"prompt": [], "chosen": [2], "rejected": [4]}', [],
     r"field 'prompt': segment is empty", "empty", "prompt"),
    ("empty completion", b'{"prompt": [1], "chosen": [2], "rejected": []}', [],
     r"field 'rejected': segment is empty", "empty", "rejected"),
    ("bad UTF-8", b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}', [],
     r"invalid UTF-8 at byte 15 of the line", "bad_utf8", None),
    ("over-long record", b'{"prompt": "' + b"x" * 5000 + b'", "chosen": "a", "rejected": "b"}',
     ["--max-record-bytes", "4KiB"], r"record longer than 4,096 bytes \(--max-record-bytes\)", "too_long", None),
]


@pytest.mark.parametrize("name, bad, extra, message, reason, field", RECORD_CLASSES, ids=[c[0] for c in RECORD_CLASSES])
def test_bad_record_stops_build(tmp_path, name, bad, extra, message, reason, field):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    out = tmp_path / "out"
    r = cli("build", src, "-o", out, *extra)
    assert r.returncode == 1
    assert re.fullmatch(rf"pairpack: error: {re.escape(str(src))}:2: {message}\n", r.stderr), r.stderr
    assert entries(tmp_path) == ["in.jsonl"]  # no dataset, no temp directory, no rejects file


@pytest.mark.parametrize("name, bad, extra, message, reason, field", RECORD_CLASSES, ids=[c[0] for c in RECORD_CLASSES])
def test_bad_record_skipped_and_written_to_rejects(tmp_path, name, bad, extra, message, reason, field):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    out = tmp_path / "out"
    r = cli("build", src, "-o", out, "--skip-invalid", *extra)
    assert r.returncode == 0, r.stderr
    assert f"rejected records 1 ({reason}: 1)" in r.stdout
    assert f"rejects written to {out}.rejects.jsonl" in r.stdout
    (rej,) = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert (rej["file"], rej["line"], rej["field"], rej["reason"]) == (str(src), 2, field, reason)
    assert re.fullmatch(message.split(": ", 1)[1] if field else message, rej["message"])  # field is its own key
    assert len(pairpack.open(out)) == 2 and pairpack.open(out).verify() == []
    assert entries(tmp_path) == ["in.jsonl", "out", "out.rejects.jsonl"]


def test_identical_pair_counted_kept_or_dropped(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD + "\n" + '{"prompt": [1], "chosen": [2, 3], "rejected": [2, 3]}\n')
    r = cli("build", src, "-o", tmp_path / "kept")
    assert r.returncode == 0 and "identical pairs  1 (kept; --drop-identical drops them)" in r.stdout
    assert len(pairpack.open(tmp_path / "kept")) == 2
    r = cli("build", src, "-o", tmp_path / "dropped", "--drop-identical")
    assert r.returncode == 0 and "identical pairs  1 (1 dropped)" in r.stdout
    assert len(pairpack.open(tmp_path / "dropped")) == 1


def test_over_long_line_without_newline_is_not_read_whole(tmp_path):
    # a binary file passed as JSONL with no newline at all: rejected from its first 4 KiB + 1
    src = tmp_path / "blob.jsonl"
    src.write_bytes(b"{" + os.urandom(300_000).replace(b"\n", b" "))
    r = cli("build", src, "-o", tmp_path / "out", "--max-record-bytes", "4KiB")
    assert r.returncode == 1 and r.stderr == f"pairpack: error: {src}:1: record longer than 4,096 bytes (--max-record-bytes)\n"


def test_foreign_file_as_build_input(tmp_path):
    src = tmp_path / "picture.jsonl"
    src.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    r = cli("build", src, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert re.fullmatch(rf"pairpack: error: {re.escape(str(src))}: an image \(PNG, JPEG, GIF, ...\) is not an input "
                        r"format pairpack reads \(JSON Lines .*\n", r.stderr), r.stderr
    assert entries(tmp_path) == ["picture.jsonl"]


@pytest.mark.parametrize("name,data,what", [
    ("t.csv", b"prompt,chosen,rejected\na,b,c\n", "CSV/TSV"),
    ("d.arrow", b"ARROW1\0\0" + bytes(64), "Arrow IPC"),
    ("x.jsonl", b"ARROW1\0\0" + bytes(64), "Arrow IPC"),  # by its first bytes, whatever its name
    ("p.jpg", b"\xff\xd8\xff\xe0" + bytes(64), "an image"),
    ("r.pkl", b"\x80\x04", "a binary Python/numpy/torch file"),
])
def test_unsupported_formats_are_named(tmp_path, name, data, what):
    src = tmp_path / name
    src.write_bytes(data)
    r = cli("build", src, "-o", tmp_path / "out")
    assert r.returncode == 1 and f"{name}: {what}" in r.stderr and "is not an input format pairpack reads" in r.stderr
    assert entries(tmp_path) == [name]


def test_existing_output_is_not_overwritten(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD + "\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("x")
    r = cli("build", src, "-o", tmp_path / "out")
    assert r.returncode == 1 and "already exists; pass --force to replace it" in r.stderr
    assert (tmp_path / "out" / "precious").read_text() == "x"


# --- dataset side -----------------------------------------------------------------------------
@pytest.fixture
def two_datasets(tmp_path):
    """Two multi-shard datasets built from different inputs (A is the one we damage)."""
    paths = []
    for name, seed in (("a", 1), ("b", 2)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"prompt": [seed, i % 7 + 1], "chosen": [i % 50 + 1] * (1 + i % 5),
                                           "rejected": [seed] * (1 + (i * seed) % 4)}) + "\n" for i in range(300)))
        r = cli("build", src, "-o", tmp_path / name, "--vocab-size", "100", "--shard-size", "1KiB")
        assert r.returncode == 0, r.stderr
        paths.append(tmp_path / name)
    assert len(pairpack.open(paths[0]).manifest.shards) >= 3
    return paths


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, fmt.file_checksum(p))
            for p in root.rglob("*") if p.is_file()}


def test_damaged_file(two_datasets):
    a, _ = two_datasets
    p = a / "shard-00001" / "tokens.npy"
    b = bytearray(p.read_bytes())
    b[-2] ^= 1
    p.write_bytes(bytes(b))
    before = _snapshot(a)
    assert cli("info", a).returncode == 0  # O(1) open does not hash: info still works
    r = cli("verify", a)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[0] == f"{a}: 1 problem(s):"
    assert re.fullmatch(rf"  - {re.escape(str(p))}: shards\[1\]\.tokens: checksum mismatch \(expected '\w+', got '\w+'\) "
                        r"\[FORMAT\.md §8 R12\]", r.stderr.splitlines()[1])
    assert _snapshot(a) == before  # verify modifies nothing


def test_truncated_file(two_datasets):
    a, _ = two_datasets
    p = a / "shard-00002" / "starts.npy"
    size = p.stat().st_size
    os.truncate(p, size - 8)
    msg = (f"{p}: shards[2].starts.bytes: file size differs from the manifest (expected {size}, got {size - 8}) "
           "[FORMAT.md §8 R5]")
    for cmd in (["info", a], ["show", a, "0"]):
        r = cli(*cmd)
        assert (r.returncode, r.stderr) == (1, f"pairpack: error: {msg}\n"), r.stderr
    r = cli("verify", a)
    assert r.returncode == 1
    assert f"  - {msg}" in r.stderr.splitlines()
    assert any("checksum mismatch" in x and "shards[2].starts" in x for x in r.stderr.splitlines())


def test_mismatched_shard(two_datasets):
    a, b = two_datasets
    shutil.rmtree(a / "shard-00001")
    shutil.copytree(b / "shard-00001", a / "shard-00001")  # a shard of another dataset
    r = cli("verify", a)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert re.fullmatch(rf"{re.escape(str(a))}: \d+ problem\(s\):", lines[0])
    assert all("shard-00001" in x for x in lines[1:]), lines
    assert any(re.search(r"(file size differs from the manifest.*§8 R5|checksum mismatch.*§8 R12)", x) for x in lines[1:])


def test_foreign_dataset_paths(tmp_path):
    (tmp_path / "notads").mkdir()
    (tmp_path / "notads" / "data.bin").write_bytes(b"\0" * 10)
    (tmp_path / "random.bin").write_bytes(os.urandom(64))
    for target, msg in ((tmp_path / "notads", f"{tmp_path / 'notads'}: manifest: manifest.json is missing: not a pairpack dataset [FORMAT.md §3]"),
                        (tmp_path / "random.bin", f"{tmp_path / 'random.bin'}: manifest: not a dataset directory [FORMAT.md §3]")):
        for cmd in (["info", target], ["show", target, "0"]):
            r = cli(*cmd)
            assert (r.returncode, r.stderr) == (1, f"pairpack: error: {msg}\n")
        r = cli("verify", target)
        assert (r.returncode, r.stderr) == (1, f"{target}: 1 problem(s):\n  - {msg}\n")
    (tmp_path / "notads" / "manifest.json").write_text('{"format": "arrow"}')
    r = cli("info", tmp_path / "notads")
    assert r.returncode == 1 and "format: not a pairpack manifest (expected 'pairpack', got 'arrow')" in r.stderr


# --- CLI basics ---------------------------------------------------------------------------------
def test_build_info_show_verify_on_the_sample(tmp_path, sample_json):
    out = tmp_path / "sample"
    r = cli("build", sample_json, "-o", out)
    assert r.returncode == 0 and "wrote" in r.stdout and "1,100 pairs" in r.stdout, r.stderr
    r = cli("info", out)
    assert r.returncode == 0 and "1,100" in r.stdout and "uint16" in r.stdout
    r = cli("show", out, "-1")
    assert r.returncode == 0 and "prompt" in r.stdout and "chosen" in r.stdout and "rejected" in r.stdout
    r = cli("show", out, "1100")
    assert r.returncode == 2 and "out of range" in r.stderr
    r = cli("verify", out)
    assert r.returncode == 0 and re.fullmatch(rf"{re.escape(str(out))}: OK \(1,100 pairs, .* MB/s\)\n", r.stdout)


def test_help_on_every_command():
    from pairpack.cli import main

    assert cli("--help").returncode == 0
    for name in sorted(main.commands):
        r = cli(name, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout, name
        assert "Example" in r.stdout, f"`pairpack {name} --help` has no example"


def test_usage_errors_have_no_traceback(tmp_path):
    for args in (["build"], ["build", tmp_path / "missing.jsonl", "-o", tmp_path / "x"], ["show", tmp_path],
                 ["build", tmp_path, "-o", tmp_path / "x", "--max-record-bytes", "lots"], ["nonsense"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
