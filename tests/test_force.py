"""``--force`` replaces only what pairpack made (FORMAT.md §9 W8, issue 15).

Every writer with a force option (build, merge, unpack, pack, export, Writer) is pointed at a user's
directory, a plain file, a link, and a dataset directory holding the user's own file: each is
refused with NotReplaceableError (one line, exit 1 on the CLI) and left byte for byte as it was.
The same commands replace their own earlier output (even a dataset whose manifest is damaged).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pairpack
from pairpack.ops.archive import pack, unpack
from pairpack.ops.export import export
from pairpack.ops.merge import merge
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "--force replaces only a"


def _dataset(path: Path, n: int = 3, first: int = 1) -> Path:
    with pairpack.Writer(path, vocab_size=50) as w:
        for i in range(n):
            w.add([first + i, 2], [3], [4, i])
    return path


def _snapshot(p: Path) -> dict[str, bytes | str]:
    """Every entry under ``p`` (or ``p`` itself): file bytes, link targets, directory markers."""
    if p.is_symlink():
        return {".": "link -> " + os.readlink(p)}
    if p.is_file():
        return {".": p.read_bytes()}
    out: dict[str, bytes | str] = {}
    for q in sorted(p.rglob("*")):
        rel = q.relative_to(p).as_posix()
        out[rel] = "link -> " + os.readlink(q) if q.is_symlink() else q.read_bytes() if q.is_file() else "dir"
    return out


def _user_things(tmp: Path) -> dict[str, Path]:
    """What a user may have at an output path: none of it is pairpack's to delete."""
    notes = tmp / "notes_dir"
    notes.mkdir()
    (notes / "notes.txt").write_text("hi\n")
    plain = tmp / "plain.txt"
    plain.write_text("my data\n")
    ds_with_readme = _dataset(tmp / "ds_with_readme")
    (ds_with_readme / "README.md").write_text("my notes about this dataset\n")  # §3.2 allows it
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"format": "something-else", "files": []}\n')
    link = tmp / "link"
    link.symlink_to(_dataset(tmp / "linked_ds"))
    return {"notes_dir": notes, "plain": plain, "ds_with_readme": ds_with_readme, "foreign": foreign,
            "link": link}


@pytest.fixture
def things(tmp_path: Path) -> dict[str, Path]:
    return _user_things(tmp_path)


def _assert_refused_and_intact(target: Path, before: dict, call) -> None:
    with pytest.raises(pairpack.NotReplaceableError, match=REFUSED) as e:
        call()
    assert isinstance(e.value, pairpack.DatasetExistsError)  # `except DatasetExistsError` still catches it
    assert _snapshot(target) == before
    assert not [q for q in target.parent.iterdir() if ".pairpack-" in q.name or ".tmp-" in q.name]


KINDS = ["notes_dir", "plain", "ds_with_readme", "foreign", "link"]


@pytest.mark.parametrize("kind", KINDS)
def test_api_writers_refuse_what_pairpack_did_not_make(tmp_path: Path, things: dict[str, Path], kind: str) -> None:
    src = _dataset(tmp_path / "src")
    archive = tmp_path / "src.pairpack.zst"
    pack(src, archive)
    target = things[kind]
    before = _snapshot(target)
    calls = {
        "Writer": lambda: pairpack.Writer(target, vocab_size=50, force=True),
        "build": lambda: pairpack.build([_jsonl(tmp_path)], target, force=True, progress=False),
        "merge": lambda: merge([src], target, force=True),
        "unpack": lambda: unpack(archive, target, force=True),
    }
    if kind in ("plain", "notes_dir", "link"):  # file outputs: pack and export
        calls["pack"] = lambda: pack(src, target, force=True)
        calls["export"] = lambda: export(src, target, force=True)
    for name, call in calls.items():
        _assert_refused_and_intact(target, before, call)


def _jsonl(tmp: Path) -> Path:
    p = tmp / "in.jsonl"
    p.write_text('{"prompt": [1, 2], "chosen": [3], "rejected": [4]}\n{"prompt": [5], "chosen": [6], "rejected": [7]}\n')
    return p


@pytest.mark.parametrize("kind", ["notes_dir", "plain"])
def test_cli_force_keeps_user_files(tmp_path: Path, things: dict[str, Path], kind: str) -> None:
    """The issue's reproduction on every command: one line naming the path, exit 1, nothing lost."""
    src = _dataset(tmp_path / "src")
    archive = tmp_path / "src.pairpack.zst"
    pack(src, archive)
    target = things[kind]
    before = _snapshot(target)
    commands = [["build", _jsonl(tmp_path), "-o", target], ["merge", src, "-o", target],
                ["unpack", archive, "-o", target], ["pack", src, "-o", target], ["export", src, "-o", target]]
    for args in commands:
        r = run_cli(*args, "--force", cwd=ROOT)
        if r.returncode == 2:  # click refuses a directory as pack's/export's output file first
            assert args[0] in ("pack", "export") and "is a directory" in r.stderr, r.stderr
        else:
            assert r.returncode == 1, (args, r.stderr)
            assert r.stderr.count("\n") == 1 and REFUSED in r.stderr and str(target) in r.stderr, r.stderr
        assert _snapshot(target) == before, args
    if kind == "notes_dir":
        assert (target / "notes.txt").read_text() == "hi\n"


def test_force_replaces_pairpack_outputs(tmp_path: Path) -> None:
    """Its own outputs are replaced: datasets (also with a damaged manifest), archives, exports."""
    src = _dataset(tmp_path / "src", n=4)
    old = _dataset(tmp_path / "out", n=2, first=20)
    pairpack.build([_jsonl(tmp_path)], old, force=True, progress=False)
    assert len(pairpack.open(old)) == 2
    merge([src], old, force=True)
    assert len(pairpack.open(old)) == 4
    archive = tmp_path / "a.pairpack.zst"
    pack(src, archive)
    unpack(archive, old, force=True)
    # a damaged dataset is what one rebuilds: its manifest still says it is pairpack's
    man = old / "manifest.json"
    man.write_bytes(man.read_bytes()[:120])
    pairpack.build([_jsonl(tmp_path)], old, force=True, progress=False)
    assert len(pairpack.open(old)) == 2
    pack(old, archive, force=True)
    unpack(archive, tmp_path / "again")
    assert len(pairpack.open(tmp_path / "again")) == 2
    out = tmp_path / "pairs.jsonl"
    export(src, out)
    export(old, out, force=True)
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(pairpack.DatasetExistsError):  # without --force nothing is replaced
        export(src, out)
    assert len(out.read_text().splitlines()) == 2


def test_force_takes_an_empty_directory(tmp_path: Path) -> None:
    """`mkdir out` before a build: nothing there to lose, so --force may replace it (not without)."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(pairpack.DatasetExistsError, match="pass --force"):
        pairpack.build([_jsonl(tmp_path)], out, progress=False)
    pairpack.build([_jsonl(tmp_path)], out, force=True, progress=False)
    assert len(pairpack.open(out)) == 2


def test_resume_with_force_refuses_a_user_directory(tmp_path: Path, things: dict[str, Path]) -> None:
    target = things["notes_dir"]
    before = _snapshot(target)
    _assert_refused_and_intact(target, before, lambda: pairpack.build([_jsonl(tmp_path)], target, force=True,
                                                                      resume=True, progress=False))
