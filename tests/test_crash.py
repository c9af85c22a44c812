"""Crash safety of `pairpack build` (issue 6): SIGKILL at random and at chosen points, full disk.

The promise (FORMAT.md §9): a dataset appears at the output path only when it is complete and
verifies; with ``--force`` the path holds either the old dataset intact or the new one complete;
a later build removes what killed builds left beside the target; a write error (disk full)
gives one clear line, a non-zero exit, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pairpack
from pairpack.read.verify import verify_dataset

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# Runs `pairpack build ARGS` with one writer-internal function wrapped so that its N-th call
# SIGKILLs the process ("before" or "after" the real call): a kill at an exact commit step.
KILL_AT = r"""
import os, shutil, signal, sys
import pairpack.format.fsio as fsio
import pairpack.write.writer as w
name, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# every module that binds the name, so that the nth call counts across them
owners = {"rename": [os], "rmtree": [shutil], "_exchange": [fsio], "_fsync_dir": [w, fsio]}.get(name, [w])
orig = getattr(owners[0], name)
calls = [0]
def wrapped(*a, **k):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = orig(*a, **k)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
for owner in owners:
    setattr(owner, name, wrapped)
from pairpack.cli import main
sys.argv = ["pairpack", "build"] + sys.argv[4:]
main()
"""


def _records(n: int, seed: int, bad_every: int = 0) -> str:
    r = random.Random(seed)
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append('{"prompt": [1, 2], "chosen": [-1], "rejected": [3]}')  # rejected by --skip-invalid
            continue
        seg = lambda: [r.randrange(1000) for _ in range(r.randint(1, 24))]  # noqa: E731
        lines.append(json.dumps({"prompt": seg() if i % 3 else [7, 7, 7], "chosen": seg(), "rejected": seg()}))
    return "\n".join(lines) + "\n"


def _build_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [str(src), "-o", str(out), "--vocab-size", "1000", "--shard-size", "16KiB", "--skip-invalid", *extra]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pairpack.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120, **kw)


def _fingerprint(path: Path) -> str:
    return pairpack.open(path).fingerprint


def _leftovers(parent: Path, name: str) -> list[str]:
    """Entries beside the target that a build made and should not have left."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{name}.") or p.name.startswith(f".{name}.rejects"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    new_src, old_src = d / "new.jsonl", d / "old.jsonl"
    new_src.write_text(_records(12_000, 1, bad_every=500))  # ~1.5 MB: builds in-process in ~0.3 s
    old_src.write_text(_records(300, 2))
    refs = {}
    for name, src in (("new", new_src), ("old", old_src)):
        r = _cli("build", *_build_args(src, d / f"ref-{name}"))
        assert r.returncode == 0, r.stderr
        refs[name] = _fingerprint(d / f"ref-{name}")
        assert len(pairpack.open(d / f"ref-{name}").manifest.shards) > 1 or name == "old"
    return {"new": new_src, "old": old_src, "ref_old": d / "ref-old", "fp": refs, "dir": d}


def _check_after_kill(out: Path, inputs: dict, *, force: bool, what: str) -> str:
    if not out.exists():
        assert not force, f"{what}: --force over an existing dataset left no dataset at the path"
        return "absent"
    assert verify_dataset(out) == [], f"{what}: a dataset at the output path does not verify"
    fp = _fingerprint(out)
    allowed = {inputs["fp"]["new"], inputs["fp"]["old"]} if force else {inputs["fp"]["new"]}
    assert fp in allowed, f"{what}: the dataset at the path is neither the old nor the new one"
    return "old" if fp == inputs["fp"]["old"] else "new"


KILL_POINTS = [  # (function, nth call, before/after): every step of shard close, commit and install
    ("_concat_npy", 1, "before"), ("_concat_npy", 2, "after"), ("_file_entry", 3, "after"),
    ("_fsync_dir", 1, "after"), ("_fsync_dir", 3, "before"), ("_exchange", 1, "before"),
    ("_exchange", 1, "after"), ("rename", 1, "before"), ("rename", 1, "after"), ("rmtree", 1, "before"),
]


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
def test_sigkill_at_each_commit_step(inputs, tmp_path, force):
    """Deterministic kills at every step of closing shards, writing the manifest and renaming."""
    seen = set()
    for name, nth, when in KILL_POINTS:
        if name == "_exchange" and not force:
            continue  # a fresh build never exchanges
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        if force:
            shutil.copytree(inputs["ref_old"], out)
        args = _build_args(inputs["new"], out, *(["--force"] if force else []))
        r = subprocess.run([sys.executable, "-c", KILL_AT, name, str(nth), when, *args], env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, -signal.SIGKILL), r.stderr
        seen.add(_check_after_kill(out, inputs, force=force, what=f"kill at {name}#{nth} {when}"))
    # the kills landed both before and after the commit point
    assert seen == ({"old", "new"} if force else {"absent", "new"}), seen
    r = _cli("build", *_build_args(inputs["new"], tmp_path / "out", "--force"))
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path, "out") == []  # the later build removed every dead build's temp
    assert _fingerprint(tmp_path / "out") == inputs["fp"]["new"]


def test_sigkill_at_random_times(inputs, tmp_path):
    """SIGKILL after a random delay, fresh and over an existing dataset (--force), many trials."""
    rng = random.Random(6)
    t0 = time.perf_counter()
    r = _cli("build", *_build_args(inputs["new"], tmp_path / "timing"))
    full = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    outcomes: dict[str, int] = {}
    for trial in range(12):
        force = trial % 2 == 1
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        if force:
            shutil.copytree(inputs["ref_old"], out)
        p = subprocess.Popen([sys.executable, "-m", "pairpack.cli", "build",
                              *_build_args(inputs["new"], out, *(["--force"] if force else []))],
                             env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # half the kills in the last part of the run, where shards close and the commit happens
        time.sleep(rng.uniform(0.05, full) if trial % 4 < 2 else rng.uniform(0.7 * full, 1.2 * full))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        kind = _check_after_kill(out, inputs, force=force, what=f"trial {trial}")
        outcomes[kind] = outcomes.get(kind, 0) + 1
    print("outcomes of random kills:", outcomes)  # shown with -s; e.g. {'absent': 5, 'new': 3, ...}
    r = _cli("build", *_build_args(inputs["new"], tmp_path / "out", "--force"))
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path, "out") == [], "a later build must remove what killed builds left"
    assert verify_dataset(tmp_path / "out") == []


# --- full disk ---------------------------------------------------------------------------------
def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("limit", [4096, 10_000, 20_000])  # spill, tokens, manifest
def test_disk_full_real_write_error(inputs, tmp_path, limit):
    """A real write error from the kernel (RLIMIT_FSIZE: EFBIG), at three points of the build."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pairpack.cli", "build", *_build_args(inputs["new"], out)],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_file_size(limit))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"pairpack: error: File too large: {out}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no dataset, no temp, no rejects file


@pytest.mark.parametrize("where", ["_flush_tokens", "_concat_npy", "_fsync_dir", "manifest"])
def test_disk_full_injected_enospc(inputs, tmp_path, monkeypatch, where):
    """ENOSPC injected at the token flush, the index files, the directory sync or the manifest."""
    import pairpack.write.writer as w
    from pairpack.ingest.build import build

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "_flush_tokens":
        monkeypatch.setattr(w._ShardWriter, "_flush_tokens", boom)
    elif where == "manifest":
        monkeypatch.setattr(w.fmt.Manifest, "dumps", boom)
    else:
        monkeypatch.setattr(w, where, boom)
    out = tmp_path / "sub" / "out"
    with pytest.raises(OSError) as ei:
        build([inputs["new"]], out, vocab_size=1000, shard_bytes=16 << 10, skip_invalid=True, workers=1)
    assert ei.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_disk_full_over_existing_dataset_keeps_it(inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(inputs["ref_old"], out)
    r = subprocess.run([sys.executable, "-m", "pairpack.cli", "build", *_build_args(inputs["new"], out, "--force")],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_file_size(20_000))  # fails at the manifest
    assert r.returncode == 1 and "File too large" in r.stderr
    assert _fingerprint(out) == inputs["fp"]["old"] and verify_dataset(out) == []
    assert _leftovers(tmp_path, "out") == []
