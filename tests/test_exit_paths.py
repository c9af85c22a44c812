"""Every exit path of a command stops and joins what it started (issue 15).

A build that fails on a compressed input exits 1 with its one-line message, every time: the input's
read-ahead thread (sources._ReadAhead) is joined before the interpreter shuts down, where it once
aborted the process (``Fatal Python error: _enter_buffered_busy``, exit 134, in most runs). Ctrl-C
ends the same way, and a closed stdout (``pairpack info D | head``) ends quietly with 141.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
RUNS = 10  # per compression; 100 of 100 measured by hand for the README


def _hh_like(n: int) -> bytes:
    """HH-RLHF-shaped records (chosen/rejected transcripts, no prompt field): about 2 KB each."""
    turn = "\n\nHuman: " + "how do I fold a paper crane? " * 30 + "\n\nAssistant: " + "fold it in half. " * 40
    lines = [json.dumps({"chosen": turn + f" {i}", "rejected": turn + f" no {i}"}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same ~10 MB of records as .jsonl.gz and .jsonl.zst: more than the read-ahead's queue
    holds, so its thread is still decompressing when the first block fails."""
    d = tmp_path_factory.mktemp("compressed")
    raw = _hh_like(5000)
    gz, zst = d / "hh.jsonl.gz", d / "hh.jsonl.zst"
    gz.write_bytes(gzip.compress(raw, compresslevel=1))
    zst.write_bytes(zstandard.ZstdCompressor(level=1).compress(raw))
    return {"gz": gz, "zst": zst}


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_failing_build_on_compressed_input_exits_1_every_time(tmp_path: Path, compressed: dict[str, Path],
                                                              kind: str) -> None:
    """The issue's reproduction (a record that does not fit ``--shape chat``), RUNS times in a row."""
    codes = []
    for k in range(RUNS):
        r = run_cli("build", compressed[kind], "-o", tmp_path / f"out{k}", "--shape", "chat", cwd=ROOT)
        codes.append(r.returncode)
        assert "Fatal Python error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("pairpack: error: ") and ":1: " in r.stderr
    assert codes == [1] * RUNS
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_ctrl_c_during_a_compressed_build_ends_cleanly(tmp_path: Path, compressed: dict[str, Path]) -> None:
    """SIGINT while the build reads: click's "Aborted!" and exit 1, no abort, no temporary left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in range(3):
        p = subprocess.Popen([sys.executable, "-m", "pairpack.cli", "build", str(compressed["gz"]), "-o",
                              str(tmp_path / "out"), "--force", "--workers", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        # the writer's temporary directory appears once the build is past its imports and set-up
        while (p.poll() is None and time.monotonic() < deadline
               and not any(".pairpack-tmp-" in x.name for x in tmp_path.iterdir())):
            time.sleep(0.01)
        time.sleep(0.05 * k)  # at different points of the read loop
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal: nothing to check this time
            continue
        assert p.returncode == 1 and "Fatal Python error" not in err and "Traceback" not in err, err
        assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, sample_json: Path) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ds"
    r = run_cli("build", sample_json, "-o", out, "--prompt-template", "alpaca", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("args", [["info", "{ds}"], ["show", "{ds}", "0"], ["stats", "{ds}"], ["--help"]])
def test_closed_stdout_ends_quietly(dataset: Path, args: list[str]) -> None:
    """stdout is a pipe whose reader is gone before the command writes: no message, exit 141
    (128 + SIGPIPE, what a shell reports for `cat big | head`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "pairpack.cli", *[a.format(ds=dataset) for a in args]],
                           stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 141


def test_info_piped_to_head_in_a_shell(dataset: Path) -> None:
    """The issue's own pipeline: nothing on stderr, and pairpack's status is 0 or 141."""
    cmd = f'"{sys.executable}" -m pairpack.cli info "{dataset}" | head -n 1; echo "status=${{PIPESTATUS[0]}}"'
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stderr == ""
    assert p.stdout.splitlines()[-1] in ("status=0", "status=141")
