"""Mutation fuzzer of the reader: shared by tests/test_fuzz.py (Hypothesis) and tools/fuzz.py.

One case = build a small valid dataset with :class:`pairpack.Writer`, damage it with 1-3 random
mutations (flip bytes, truncate or extend files, edit manifest numbers and names, swap files
between shards, shrink offsets, rewrite .npy headers, replace files by links/dirs/FIFOs), then
open it, read every pair, assemble batches and verify. The property (issue 6):

* pairpack raises nothing but :class:`pairpack.PairpackError` (``IndexError`` only for a bad
  index we pass on purpose), never hangs, never reads outside the dataset;
* whatever it returns equals what an independent reader (``json`` + ``numpy`` only, below)
  reads from the same files, and every segment lies inside its token file;
* ``verify_dataset`` never raises; it reports a problem whenever ``open`` fails; and when only
  data files were damaged (manifest untouched) an empty report means the pairs are the
  original ones.

Every random choice comes from one ``random.Random``, so a case is reproducible from its seed
(tools/fuzz.py) and Hypothesis can shrink it (``st.randoms()``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

import pairpack
from pairpack import format as fmt
from pairpack.read.verify import verify_dataset

__all__ = ["run_case", "reference_read", "make_dataset", "CaseFailure", "CaseTimeout"]


class CaseFailure(AssertionError):
    """The property failed for a case; the message says how."""


class CaseTimeout(BaseException):
    """Raised from a SIGALRM handler when a case blocks. Not an OSError (TimeoutError is one,
    and pairpack turns OSErrors into FormatErrors) nor an Exception, so nothing can swallow it."""


# --- a small valid dataset ------------------------------------------------------------------------
def make_dataset(rng: random.Random, root: Path) -> list[tuple[list[int], list[int], list[int]]]:
    """Write a random small dataset at ``root`` (0-12 pairs, often several shards); return its pairs."""
    vocab = rng.choice([20, 300, 70_000])
    n = rng.choice([0, 1, 2, 3, 5, 8, 12])
    pool = [[rng.randrange(vocab) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
    seg = lambda: [rng.randrange(vocab) for _ in range(rng.randint(1, 7))]  # noqa: E731
    pairs = [(rng.choice(pool), seg(), seg()) for _ in range(n)]
    cols = rng.choice([{}, {"score": "float32"}, {"score": "float64", "ref": "int64"}])
    itemsize = 2 if vocab <= 65536 else 4
    shard_bytes = rng.choice([1 << 20, 16 * itemsize, 30 * itemsize])
    with pairpack.Writer(root, vocab_size=vocab, pad_id=rng.randrange(vocab), columns=cols,
                         shard_bytes=shard_bytes, dedup_window=rng.choice([0, 16])) as w:
        for j, (p, c, r) in enumerate(pairs):
            w.add(p, c, r, **{k: (j * 0.5 - 1 if "float" in v else j - 3) for k, v in cols.items()})
    return pairs


# --- the independent reference reader (json + numpy, nothing from pairpack) ----------------------
def reference_read(root: Path) -> dict[str, Any]:
    """Read a dataset the way spec/FORMAT.md describes it, with json and numpy only.

    Returns pairs (list of 3 int64 arrays), lengths (3, N), pad_id and columns (name -> (N,)).
    Raises CaseFailure if a segment lies outside its token file (pairpack must then have refused).
    """
    m = json.loads((root / "manifest.json").read_bytes())
    pairs: list[tuple[np.ndarray, ...]] = []
    lengths = []
    cols: dict[str, list[np.ndarray]] = {c["name"]: [] for c in m["columns"]}
    for s in m["shards"]:
        load = lambda e: np.load(root / e["path"], mmap_mode="r", allow_pickle=False)  # noqa: E731
        tokens, starts, lens = (load(s["files"][k]) for k in ("tokens", "starts", "lengths"))
        if tokens.ndim != 1 or starts.shape != (3, s["num_pairs"]) or lens.shape != starts.shape:
            raise CaseFailure(f"pairpack accepted shapes {tokens.shape} {starts.shape} {lens.shape}")
        for j in range(s["num_pairs"]):
            segs = []
            for k in range(3):
                a, n = int(starts[k, j]), int(lens[k, j])
                if not (0 <= a and 1 <= n and a + n <= len(tokens)):
                    raise CaseFailure(f"pairpack accepted segment [{a}, +{n}) of {len(tokens)} tokens")
                segs.append(np.asarray(tokens[a:a + n], dtype=np.int64))
            pairs.append(tuple(segs))
        lengths.append(np.asarray(lens, dtype=np.int64))
        for name in cols:
            cols[name].append(np.asarray(load(s["columns"][name])))
    return {
        "pairs": pairs,
        "lengths": np.concatenate(lengths, axis=1) if lengths else np.zeros((3, 0), np.int64),
        "pad_id": m["pad_id"],
        "columns": {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()},
    }


# --- mutations ---------------------------------------------------------------------------------
def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _load_manifest(root: Path) -> Any:
    if not (root / "manifest.json").is_file():  # a FIFO would block: the mutator gives up
        raise ValueError("manifest.json is not a regular file")
    return json.loads((root / "manifest.json").read_bytes())


def _save_manifest(root: Path, m: Any) -> None:
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


def _leaves(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, path + (i,))
    else:
        out.append((path, obj))
    return out


def _set(obj: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _rehash(root: Path) -> None:
    """Make every manifest file entry match the file now on disk (size and checksum)."""
    m = _load_manifest(root)
    for s in m["shards"]:
        for e in list(s["files"].values()) + list(s["columns"].values()):
            p = root / e["path"]
            if p.is_file():
                e["bytes"] = p.stat().st_size
                e[fmt.CHECKSUM_KEY] = fmt.file_checksum(p)
    _save_manifest(root, m)


def _mut_flip(rng: random.Random, root: Path) -> str:
    f = rng.choice(_files(root))
    data = bytearray(f.read_bytes())
    if not data:
        return "flip: empty file"
    hi = len(data) if rng.random() < 0.5 else min(len(data), 140)  # the .npy header half the time
    i = rng.randrange(hi)
    data[i] ^= rng.choice([1, 0x80, 0xFF, rng.randrange(1, 256)])
    f.write_bytes(bytes(data))
    return f"flip {f.relative_to(root)}[{i}]"


def _mut_truncate(rng: random.Random, root: Path) -> str:
    f = rng.choice(_files(root))
    size = f.stat().st_size
    new = rng.choice([0, 5, 64, 127, 128, max(size - 1, 0), rng.randrange(size + 1)])
    os.truncate(f, min(new, size))
    return f"truncate {f.relative_to(root)} {size}->{min(new, size)}"


def _mut_extend(rng: random.Random, root: Path) -> str:
    f = rng.choice(_files(root))
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 8, 64])))
    with open(f, "ab") as fh:
        fh.write(extra)
    return f"extend {f.relative_to(root)} +{len(extra)}"


_NUMBERS = [0, 1, -1, 2, 3, 7, 2**15, 2**16, 2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64,
            -2**63, 10**30, 10**5000, 1.5, float("nan"), "1", None, True, [], {}]


def _mut_manifest_number(rng: random.Random, root: Path) -> str:
    m = _load_manifest(root)
    leaves = [(p, v) for p, v in _leaves(m) if isinstance(v, int) and not isinstance(v, bool)]
    if not leaves:
        return "number: none"
    path, v = rng.choice(leaves)
    new = rng.choice(_NUMBERS + [v + 1, v - 1, v * 2, v // 2])
    if isinstance(new, int) and abs(new) > 10**100:
        # json.dumps refuses integers beyond Python's digit limit: write the text ourselves
        _set(m, path, 0)
        text = json.dumps(m, indent=1)
        key = json.dumps(path[-1]) if isinstance(path[-1], str) else None
        (root / "manifest.json").write_text(text.replace(f"{key}: 0", f"{key}: {'9' * 5000}", 1)
                                            if key else text)
    else:
        _set(m, path, new)
        _save_manifest(root, m)
    shown = "9" * 20 + "..." if isinstance(new, int) and abs(new) > 10**100 else repr(new)[:20]
    return f"number {'.'.join(map(str, path))}: {v} -> {shown}"


def _mut_manifest_string(rng: random.Random, root: Path) -> str:
    m = _load_manifest(root)
    leaves = [(p, v) for p, v in _leaves(m) if isinstance(v, str)]
    if not leaves:
        return "string: none"
    path, v = rng.choice(leaves)
    others = [x for _, x in leaves]
    new = rng.choice([rng.choice(others), "../x.npy", "/etc/hostname", "shard-00000/../manifest.json",
                      "", ".", "manifest.json", "nope.npy", v + "\n", v.upper(), "a" * 300, "uint32",
                      "uint16", "float64", "int32", "object", "shard-00001", "x/../" + v, v + "/", 7])
    _set(m, path, new)
    _save_manifest(root, m)
    return f"string {'.'.join(map(str, path))}: {v[:30]!r} -> {str(new)[:30]!r}"


def _mut_manifest_structure(rng: random.Random, root: Path) -> str:
    m = _load_manifest(root)
    kind = rng.randrange(7)
    if kind == 0:  # drop a key somewhere
        dicts = [(p, d) for p, d in _walk_dicts(m) if d]
        p, d = rng.choice(dicts)
        k = rng.choice(sorted(d))
        del d[k]
        what = f"del {'.'.join(map(str, p + (k,)))}"
    elif kind == 1 and m["shards"]:  # duplicate a shard entry
        m["shards"].append(json.loads(json.dumps(rng.choice(m["shards"]))))
        what = "duplicate shard"
    elif kind == 2 and m["shards"]:  # drop a shard (num_pairs now disagrees)
        m["shards"].pop(rng.randrange(len(m["shards"])))
        what = "drop shard"
    elif kind == 3 and len(m["shards"]) > 1:  # swap whole shard entries (reorders pairs)
        i, j = rng.sample(range(len(m["shards"])), 2)
        m["shards"][i], m["shards"][j] = m["shards"][j], m["shards"][i]
        what = f"swap shard entries {i} {j}"
    elif kind == 4 and m["shards"]:  # swap one file entry between two shards
        a, b = rng.choice(m["shards"]), rng.choice(m["shards"])
        k = rng.choice(list(fmt.INDEX_FILES))
        a["files"][k], b["files"][k] = b["files"][k], a["files"][k]
        what = f"swap {k} entries"
    elif kind == 5:  # declare a column that has no files
        m["columns"].append({"name": "ghost", "dtype": "float32", "description": "", "attrs": {}})
        what = "ghost column"
    else:  # not a JSON object / not JSON at all / deeply nested
        text = rng.choice(["[]", "null", "{", "\xff\xfe", "[" * 100_000 + "]" * 100_000, '{"format": 1}'])
        (root / "manifest.json").write_text(text, encoding="latin1")
        return f"manifest text {text[:10]!r}"
    _save_manifest(root, m)
    return what


def _walk_dicts(obj: Any, path: tuple = ()) -> list[tuple[tuple, dict]]:
    out = []
    if isinstance(obj, dict):
        out.append((path, obj))
        for k, v in obj.items():
            out += _walk_dicts(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _walk_dicts(v, path + (i,))
    return out


def _shard_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("shard-"))


def _mut_swap_files(rng: random.Random, root: Path) -> str:
    dirs = _shard_dirs(root)
    if not dirs:
        return "swap: no shards"
    if len(dirs) > 1:
        a, b = rng.sample(dirs, 2)
        name = rng.choice([fmt.TOKENS_FILE, fmt.STARTS_FILE, fmt.LENGTHS_FILE])
        fa, fb = a / name, b / name
    else:
        fa, fb = (dirs[0] / n for n in rng.sample([fmt.TOKENS_FILE, fmt.STARTS_FILE, fmt.LENGTHS_FILE], 2))
    if not (fa.exists() and fb.exists()):
        return "swap: missing"
    tmp = root / ".swap"
    os.rename(fa, tmp)
    os.rename(fb, fa)
    os.rename(tmp, fb)
    return f"swap {fa.relative_to(root)} <-> {fb.relative_to(root)}"


def _mut_offsets(rng: random.Random, root: Path) -> str:
    """Change one int64 in starts.npy or lengths.npy in place (the header is kept)."""
    dirs = _shard_dirs(root)
    if not dirs:
        return "offsets: no shards"
    f = rng.choice(dirs) / rng.choice([fmt.STARTS_FILE, fmt.LENGTHS_FILE])
    if not f.is_file() or f.stat().st_size < fmt.NPY_HEADER_BYTES + 8:
        return "offsets: empty"
    data = bytearray(f.read_bytes())
    n = (len(data) - fmt.NPY_HEADER_BYTES) // 8
    i = rng.randrange(n)
    off = fmt.NPY_HEADER_BYTES + 8 * i
    (v,) = struct.unpack_from("<q", data, off)
    new = rng.choice([v - 1, v + 1, 0, -1, v // 2, v - 3, 2**62, -2**63, 2**63 - 1, v + 1000])
    struct.pack_into("<q", data, off, new)
    f.write_bytes(bytes(data))
    return f"offset {f.relative_to(root)}[{i}]: {v} -> {new}"


def _mut_header(rng: random.Random, root: Path) -> str:
    """Rewrite a .npy header (dtype, shape, order, version, pickles), keeping the data bytes."""
    npys = [p for p in _files(root) if p.suffix == ".npy"]
    if not npys:
        return "header: none"
    f = rng.choice(npys)
    data = f.read_bytes()[fmt.NPY_HEADER_BYTES:]
    descr = rng.choice(["<u2", "<u4", "<i8", ">i8", ">u2", "|u1", "<f4", "<f8", "|O", "<i4", "<U4", "|V8",
                        "[('a', '<u2')]", "('<u2', (2,))"])
    shape = rng.choice(["(0,)", "(3, 0)", "(1,)", "(2**62,)", "(%d,)" % (len(data) // 2), "(3, 1)",
                        "(-1,)", "(1, 2, 3)", "()", "(%d,)" % (2**63 - 1), "(3, %d)" % (len(data) // 24)])
    shape = shape.replace("2**62", str(2**62))
    fortran = rng.choice(["False", "True"])
    text = "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (
        descr if descr.startswith(("[", "(")) else repr(descr), fortran, shape)
    version = rng.choice([1, 2, 3])
    hlen_size = 2 if version == 1 else 4
    total = 64 * ((8 + hlen_size + len(text) + 1 + 63) // 64)
    body = text.encode() + b" " * (total - 8 - hlen_size - len(text) - 1) + b"\n"
    head = fmt.NPY_MAGIC + bytes([version, 0]) + len(body).to_bytes(hlen_size, "little") + body
    f.write_bytes(head + data)
    return f"header {f.relative_to(root)}: v{version} {text}"


def _mut_replace(rng: random.Random, root: Path) -> str:
    """Replace a file by a symlink out, a symlink in, a directory, a FIFO, or nothing."""
    files = _files(root)
    f = rng.choice(files)
    kind = rng.choice(["link_out", "link_in", "dir", "fifo", "delete", "link_loop"])
    outside = root.parent / "outside.npy"
    if not outside.exists():
        shutil.copyfile(f, outside)  # a perfectly valid file, but outside the dataset
    f.unlink()
    if kind == "link_out":
        os.symlink(outside, f)
    elif kind == "link_in":
        os.symlink(rng.choice(files) if len(files) > 1 else outside, f)
    elif kind == "dir":
        f.mkdir()
    elif kind == "fifo":
        os.mkfifo(f)
    elif kind == "link_loop":
        os.symlink(f, f)
    return f"replace {f.relative_to(root)} by {kind}"


def _mut_shard_dir_link(rng: random.Random, root: Path) -> str:
    """Move a shard directory outside and leave a symlink to it (a symlink leading out)."""
    dirs = _shard_dirs(root)
    if not dirs:
        return "shard link: no shards"
    d = rng.choice(dirs)
    out = root.parent / ("moved-" + d.name)
    if out.exists():
        return "shard link: exists"
    shutil.move(str(d), out)
    os.symlink(out, d)
    return f"shard dir {d.name} -> symlink out"


MUTATIONS = {
    "flip": (_mut_flip, True),  # (function, touches data files only)
    "truncate": (_mut_truncate, True),
    "extend": (_mut_extend, True),
    "swap_files": (_mut_swap_files, True),
    "offsets": (_mut_offsets, True),
    "header": (_mut_header, True),
    "replace": (_mut_replace, False),
    "shard_dir_link": (_mut_shard_dir_link, False),
    "manifest_number": (_mut_manifest_number, False),
    "manifest_string": (_mut_manifest_string, False),
    "manifest_structure": (_mut_manifest_structure, False),
}


# --- one case ----------------------------------------------------------------------------------
def _expected_batch(ref: dict[str, Any], idx: np.ndarray) -> tuple[np.ndarray, ...]:
    rows = []
    for side in (1, 2):
        rows.append([np.concatenate([ref["pairs"][i][0], ref["pairs"][i][side]]) for i in idx])
    width = max((len(r) for side in rows for r in side), default=0)
    seqs = np.full((2, len(idx), width), ref["pad_id"], dtype=np.int64)
    masks = np.zeros((2, len(idx), width), dtype=bool)
    pmask = np.zeros((len(idx), width), dtype=bool)
    for s in (0, 1):
        for b, r in enumerate(rows[s]):
            seqs[s, b, :len(r)] = r
            masks[s, b, :len(r)] = True
    for b, i in enumerate(idx):
        pmask[b, :len(ref["pairs"][i][0])] = True
    return seqs[0], seqs[1], masks[0], masks[1], pmask


def _check_against_reference(root: Path, ds: pairpack.Dataset, got: list, rng: random.Random) -> None:
    ref = reference_read(root)
    if len(got) != len(ref["pairs"]):
        raise CaseFailure(f"{len(got)} pairs read, reference reads {len(ref['pairs'])}")
    for i, (g, r) in enumerate(zip(got, ref["pairs"])):
        for k in range(3):
            if not np.array_equal(np.asarray(g[k], dtype=np.int64), r[k]):
                raise CaseFailure(f"pair {i} segment {k}: {g[k]} != reference {r[k]}")
    if not np.array_equal(ds.lengths, ref["lengths"]):
        raise CaseFailure("ds.lengths differs from the reference")
    for name, col in ref["columns"].items():
        if not np.array_equal(ds.column(name), col, equal_nan=True):
            raise CaseFailure(f"column {name} differs from the reference")
    n = len(got)
    for idx in (np.arange(n), np.array([rng.randrange(n) for _ in range(rng.randint(1, 5))] if n else [], dtype=np.int64)):
        b = ds.batch(idx, columns=list(ref["columns"]))
        exp = _expected_batch(ref, idx)
        names = ("preferred_seq", "unpreferred_seq", "preferred_seq_mask", "unpreferred_seq_mask", "prompt_mask")
        for name, e in zip(names, exp):
            t = getattr(b, name).numpy()
            if t.shape != e.shape or not np.array_equal(t, e):
                raise CaseFailure(f"batch {idx.tolist()}: {name} differs from the reference")


def _original_equal(got: list, pairs: list) -> bool:
    return len(got) == len(pairs) and all(
        all(np.array_equal(np.asarray(g[k]), np.asarray(p[k])) for k in range(3)) for g, p in zip(got, pairs))


def run_case(rng: random.Random, workdir: Path, log: list[str] | None = None) -> str:
    """Run one fuzz case in the empty directory ``workdir``; return its outcome.

    ``log``, when given, receives a description of each mutation applied.

    Outcomes: ``"refused <section>"`` (open/read raised PairpackError), ``"ok clean"`` (read fine,
    verify found nothing) or ``"ok <n> problems"``. Raises CaseFailure (or the unexpected
    exception itself) when the property fails.
    """
    root = workdir / "ds"
    pairs = make_dataset(rng, root)
    data_only = True
    steps = log if log is not None else []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(sorted(MUTATIONS))
        fn, only_data = MUTATIONS[name]
        try:
            steps.append(fn(rng, root))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, RecursionError) as e:
            # an earlier mutation left nothing this one can work on (e.g. the manifest is no
            # longer JSON): the mutator gives up; pairpack is not involved yet
            steps.append(f"{name}: skipped ({type(e).__name__})")
        data_only &= only_data
    if rng.random() < 0.3:
        _rehash_safe(root)  # checksums match again: verify must rely on its invariants
        data_only = False
        steps.append("rehash")
    report = verify_dataset(root)  # never raises, whatever the damage
    if not isinstance(report, list) or not all(isinstance(p, str) for p in report):
        raise CaseFailure(f"verify_dataset returned {report!r}")
    try:
        ds = pairpack.open(root)
        got = [ds[i] for i in range(len(ds))]
        try:
            ds[len(ds)]
            raise CaseFailure("ds[len(ds)] did not raise IndexError")
        except IndexError:
            pass
        _ = ds.lengths
        problems = ds.verify()
    except pairpack.PairpackError as e:
        if not report:
            raise CaseFailure(f"open/read refused ({e}) but verify_dataset reported nothing; steps {steps}")
        return f"refused {getattr(e, 'section', None) or type(e).__name__}"
    _check_against_reference(root, ds, got, rng)
    if problems and not report:
        raise CaseFailure(f"Dataset.verify found {problems} but verify_dataset nothing; steps {steps}")
    if not report and data_only and not _original_equal(got, pairs):
        raise CaseFailure(f"verify found nothing but the pairs changed; steps {steps}")
    return "ok clean" if not report else f"ok {min(len(report), 3)}+ problems" if len(report) >= 3 else f"ok {len(report)} problems"


def _rehash_safe(root: Path) -> None:
    if not (root / "manifest.json").is_file():  # replaced by a FIFO or a directory
        return
    try:
        _rehash(root)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError):
        pass  # the manifest itself is damaged beyond rehashing: keep it as it is
