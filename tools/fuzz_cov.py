"""Coverage-guided fuzzing (atheris 3.0.0, libFuzzer) of the two readers that take untrusted bytes.

    pip install atheris==3.0.0               # or: pip install -e ".[fuzz]"
    python tools/fuzz_cov.py json    -runs=200000            # the JSONL reader of `pairpack build`
    python tools/fuzz_cov.py dataset -max_total_time=600     # the dataset reader
    python tools/fuzz_cov.py json --replay crash-1234        # rerun one input (any libFuzzer output)

Targets (the rest of the command line goes to libFuzzer; the seeds in tools/fuzz_corpus/<target>
are read first, new interesting inputs are written to a scratch corpus, never into the repo):

json     the input is one JSONL block. It goes through the C reader (``_native.scan_ids``), the
         Python fast path and the exact path (orjson + pairpack's record checks): all three must
         give the same ids, lengths, identical counts and errors. Any difference, or any exception,
         is a crash.
dataset  the first input byte picks a file of a small valid dataset (manifest, tokens, starts,
         lengths, a column) and the rest replaces its bytes; bit 7 of the second byte re-hashes
         the manifest so the reader gets past the checksums. Then ``pairpack.open``, every pair,
         a batch (C kernels), ``take`` and ``verify``: only PairpackError may escape (R1-R13),
         and nothing may crash the process.

Coverage: atheris instruments pairpack's Python modules (the exact path, the reader's checks).
The C kernels give libFuzzer coverage only when built with clang's ``-fsanitize=fuzzer-no-link``;
with gcc (this machine) they run on every input and are checked by the comparisons above, but
their branches do not guide the mutations. ``make sanitize`` runs the corpus under ASan + UBSan.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "tools" / "fuzz_corpus"

import atheris  # noqa: E402

with atheris.instrument_imports(include=["pairpack"]):
    import numpy as np

    import pairpack
    from pairpack import _accel
    from pairpack import format as fmt
    from pairpack.ingest.blocks import BlockResult, _Job, _process_records, make_extractor, process_block
    from pairpack.ingest.shapes import ShapeOptions
    from pairpack.ingest.sources import Block, block_records
    from pairpack.read.verify import verify_dataset

# --- json: three readers, one answer --------------------------------------------------------------
_JOBS = [_Job(opts=ShapeOptions(shape="fields"), tokenizer=None, mode="ids", limit=limit, bos=None, eos=None,
              drop_identical=drop) for limit in (1000, 2**32) for drop in (False, True)]
_EXTRACT = make_extractor(ShapeOptions(shape="fields"))


def _key(r: BlockResult) -> tuple:
    return (r.tokens.tolist(), r.lengths.tolist(), r.errors, r.identical, r.identical_dropped, r.records)


def json_one(data: bytes) -> None:
    job = _JOBS[data[0] % len(_JOBS)] if data else _JOBS[0]
    block = Block("fuzz.jsonl", 1, data=data[1:], max_record_bytes=1 << 12)
    native = _accel.native
    try:
        c_path = process_block(job, _EXTRACT, block)  # the C reader where it is sure, else Python
        _accel.native = None
        fast = process_block(job, _EXTRACT, block)  # the Python fast path
    finally:
        _accel.native = native
    exact = _process_records(job, _EXTRACT, block_records(block), block.path)
    if not _key(c_path) == _key(fast) == _key(exact):
        raise AssertionError(f"paths differ on {data!r}:\n C {_key(c_path)}\n fast {_key(fast)}\n exact {_key(exact)}")


# --- dataset: any bytes in one file of a valid dataset --------------------------------------------
_SCRATCH = Path(tempfile.mkdtemp(prefix="pairpack-fuzzcov-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_BASE = _SCRATCH / "base"
_CASE = _SCRATCH / "case"


def _base_dataset() -> list[str]:
    """A 2-shard dataset with a column; returns its files (the targets of the first byte)."""
    if not _BASE.exists():
        with pairpack.Writer(_BASE, vocab_size=300, pad_id=0, columns={"score": "float32"}, shard_bytes=24) as w:
            for j in range(5):
                w.add([1 + j, 2], [3, 4 + j], [250, 6, j], score=j * 0.5)
    return sorted(p.relative_to(_BASE).as_posix() for p in _BASE.rglob("*") if p.is_file())


def dataset_one(data: bytes) -> None:
    files = _base_dataset()
    if len(data) < 2:
        return
    target, rehash, body = files[data[0] % len(files)], data[1] & 0x80, data[2:]
    shutil.rmtree(_CASE, ignore_errors=True)
    shutil.copytree(_BASE, _CASE)
    (_CASE / target).write_bytes(body)
    if rehash and target != fmt.MANIFEST_NAME:
        m = json.loads((_CASE / fmt.MANIFEST_NAME).read_bytes())
        for s in m["shards"]:
            for e in [*s["files"].values(), *s.get("columns", {}).values()]:
                if e.get("path") == target:
                    e["bytes"], e[fmt.CHECKSUM_KEY] = len(body), fmt.file_checksum(_CASE / target)
        (_CASE / fmt.MANIFEST_NAME).write_text(json.dumps(m))
    problems = verify_dataset(_CASE)
    try:
        ds = pairpack.open(_CASE)
        n = len(ds)
        for i in range(n):
            ds[i]
        if n:
            idx = np.arange(-n, n, max(1, n // 3))
            ds.batch(idx, columns=list(ds.column_names))
            ds.take(idx)
        ds.verify()
    except pairpack.PairpackError:
        if not problems:
            raise AssertionError(f"the reader refused {target} but verify_dataset found nothing") from None


TARGETS = {"json": json_one, "dataset": dataset_one}


def _seeds(target: str) -> Path:
    """A scratch corpus holding the repo's seeds (libFuzzer writes new inputs into it)."""
    work = _SCRATCH / f"corpus-{target}"
    shutil.copytree(CORPUS / target, work, dirs_exist_ok=True)
    return work


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(__doc__)
    target, rest = sys.argv[1], sys.argv[2:]
    fn = TARGETS[target]
    if rest[:1] == ["--replay"]:
        for p in rest[1:]:
            fn(Path(p).read_bytes())
            print(f"{p}: ok")
        return
    # keep every seed: the dataset seeds differ in which file they target, which coverage cannot
    # tell apart (without this libFuzzer keeps one of the 21 and never mutates the manifest seed)
    if not any(a.startswith("-keep_seed") for a in rest):
        rest = ["-keep_seed=1", *rest]
    try:
        atheris.Setup([sys.argv[0], *rest, str(_seeds(target))], fn)
        atheris.Fuzz()
    finally:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
