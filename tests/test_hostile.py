"""Hostile and damaged datasets: one test per reader check of spec/FORMAT.md §8 (R1-R17).

Each test damages a valid dataset in exactly one way and pins the typed error (class, message
and FORMAT.md rule). Open-time checks (R1-R11) raise from ``pairpack.open``; checks over the
whole data (R12-R17) are reported by ``verify`` (and R13 also raises on every read). Where a
test must change a data file without tripping R5/R12, it re-records sizes and checksums in the
manifest (``_rehash``) so that only the rule under test can fire.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import pairpack
from pairpack import ChecksumError, FormatError, PairpackError
from pairpack import format as fmt
from pairpack.read.verify import verify_dataset

ROOT = Path(__file__).resolve().parent.parent

# three pairs, the first two sharing a prompt (like the spec's worked example)
PAIRS = [([5, 6, 7], [8, 9, 2], [10, 2]), ([5, 6, 7], [11, 2], [12, 13, 14, 2]), ([15, 16], [17, 2], [18, 19, 2])]


def make(root: Path, pairs=PAIRS, *, vocab: int = 32, shard_bytes: int = 1 << 30, columns=None) -> Path:
    cols = columns or {}
    with pairpack.Writer(root, vocab_size=vocab, pad_id=0, shard_bytes=shard_bytes,
                         columns={k: v[0] for k, v in cols.items()}) as w:
        for j, (p, c, r) in enumerate(pairs):
            w.add(p, c, r, **{k: v[1][j] for k, v in cols.items()})
    return root


@pytest.fixture
def ds(tmp_path) -> Path:
    return make(tmp_path / "ds")


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


def edit(root: Path, fn) -> None:
    m = manifest(root)
    fn(m)
    save(root, m)


def _rehash(root: Path) -> None:
    m = manifest(root)
    for s in m["shards"]:
        for e in list(s["files"].values()) + list(s["columns"].values()):
            p = root / e["path"]
            e["bytes"], e["xxh3_128"] = p.stat().st_size, fmt.file_checksum(p)
    save(root, m)


def write_array(root: Path, rel: str, arr: np.ndarray) -> None:
    """Replace a data file by a valid pairpack .npy of ``arr`` and re-record sizes/checksums."""
    (root / rel).write_bytes(fmt.npy_header(arr.dtype, arr.shape) + np.ascontiguousarray(arr).tobytes())
    _rehash(root)


def raw_npy(header: str, data: bytes = b"", *, version: int = 1, pad_to: int = 64) -> bytes:
    """A hand-made .npy: magic, version, header length, header text padded to ``pad_to``."""
    n = 2 if version == 1 else 4
    total = -(-(8 + n + len(header) + 1) // pad_to) * pad_to
    body = header.encode("latin1") + b" " * (total - 8 - n - len(header) - 1) + b"\n"
    return fmt.NPY_MAGIC + bytes([version, 0]) + len(body).to_bytes(n, "little") + body + data


def opens(root: Path) -> pairpack.Dataset:
    return pairpack.open(root)


def problems(root: Path) -> str:
    out = verify_dataset(root)
    assert out, "verify reported nothing"
    return "\n".join(out)


# --- R1: manifest size cap and JSON ------------------------------------------------------------
def test_r1_huge_manifest_refused_before_parsing(ds, monkeypatch):
    with open(ds / "manifest.json", "r+b") as f:  # sparse: costs no disk
        f.truncate(fmt.MANIFEST_MAX_BYTES + 1)
    monkeypatch.setattr(fmt, "parse_manifest", lambda *a, **k: pytest.fail("parsed an over-cap manifest"))
    tracemalloc.start()
    with pytest.raises(FormatError, match=r"manifest is larger than the cap .*§8 R1"):
        opens(ds)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # refused unread: nothing near the 64 MiB was allocated


@pytest.mark.parametrize("text", [b"{", b"\xff\xfe{}", b"[" * 200_000 + b"]" * 200_000,
                                  b'{"format": "pairpack", "num_pairs": ' + b"9" * 5000 + b"}"])
def test_r1_manifest_not_json(ds, text):
    (ds / "manifest.json").write_bytes(text)
    with pytest.raises(FormatError, match=r"manifest is not valid UTF-8 JSON .*§8 R1"):
        opens(ds)


def test_r1_manifest_not_an_object(ds):
    (ds / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match=r"manifest must be a JSON object"):
        opens(ds)


# --- R2: format name and version ---------------------------------------------------------------
def test_r2_foreign_format(ds):
    edit(ds, lambda m: m.update(format="safetensors"))
    with pytest.raises(FormatError, match=r"format: not a pairpack manifest .*'safetensors'.*§8 R2"):
        opens(ds)


def test_r2_future_version(ds):
    edit(ds, lambda m: m.update(format_version=2))
    with pytest.raises(FormatError, match=r"format_version: unsupported format version; upgrade pairpack.*§8 R2"):
        opens(ds)


# --- R3: paths stay inside the dataset and are distinct --------------------------------------------
@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.npy", "shard-00000/../../x.npy", "shard-00000/./tokens.npy",
                                 "", "shard-00000\\tokens.npy", "a/\x00/b"])
def test_r3_path_outside_or_unclean(ds, bad):
    edit(ds, lambda m: m["shards"][0]["files"]["tokens"].update(path=bad))
    with pytest.raises(FormatError, match=r"shards\[0\]\.files\.tokens\.path: file paths must be relative.*§8 R3"):
        opens(ds)


def test_r3_symlink_leading_out(ds, tmp_path):
    outside = tmp_path / "stolen.npy"
    (ds / "shard-00000" / "tokens.npy").rename(outside)  # a valid file, but outside the dataset
    os.symlink(outside, ds / "shard-00000" / "tokens.npy")
    with pytest.raises(FormatError, match=r"tokens\.npy: path: file resolves outside the dataset directory.*§8 R3"):
        opens(ds)
    assert "resolves outside" in problems(ds)


def test_r3_symlinked_shard_dir_leading_out(ds, tmp_path):
    (ds / "shard-00000").rename(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", ds / "shard-00000")
    with pytest.raises(FormatError, match=r"resolves outside the dataset directory.*§8 R3"):
        opens(ds)


def test_r3_symlinked_manifest_leading_out(ds, tmp_path):
    (ds / "manifest.json").rename(tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", ds / "manifest.json")
    with pytest.raises(FormatError, match=r"manifest\.json: path: file resolves outside.*§8 R3"):
        opens(ds)


def test_r3_symlink_inside_is_fine(ds):
    # a link that stays inside the dataset is allowed (copy tools may produce them)
    (ds / "shard-00000" / "starts.npy").rename(ds / "starts-real.npy")
    os.symlink("../starts-real.npy", ds / "shard-00000" / "starts.npy")
    assert opens(ds)[1].chosen.tolist() == [11, 2]


def test_r3_symlink_loop(ds):
    p = ds / "shard-00000" / "tokens.npy"
    p.unlink()
    os.symlink(p, p)
    with pytest.raises(FormatError, match=r"(cannot resolve path|file is missing|cannot stat).*§8 R[34]"):
        opens(ds)


def test_r3_two_entries_same_file(ds):
    def dup(m):
        m["shards"][0]["files"]["lengths"]["path"] = m["shards"][0]["files"]["starts"]["path"]
    edit(ds, dup)
    with pytest.raises(FormatError, match=r"shards\[0\]: two entries name the same file.*§8 R3"):
        opens(ds)


# --- R4: files exist and are regular files ------------------------------------------------------
def test_r4_missing_file(ds):
    (ds / "shard-00000" / "lengths.npy").unlink()
    with pytest.raises(FormatError, match=r"lengths\.npy: shards\[0\]\.lengths: file is missing.*§8 R4"):
        opens(ds)


def test_r4_directory_instead_of_file(ds):
    p = ds / "shard-00000" / "tokens.npy"
    p.unlink()
    p.mkdir()
    with pytest.raises(FormatError, match=r"expected a regular file, found a directory.*§8 R4"):
        opens(ds)


def test_r4_fifo_is_never_opened(ds):
    # opening a FIFO would block forever: the reader must refuse it from its stat alone
    p = ds / "shard-00000" / "starts.npy"
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(FormatError, match=r"expected a regular file, found not a regular file.*§8 R4"):
        opens(ds)
    assert "not a regular file" in problems(ds)
    (ds / "manifest.json").rename(ds / "m.json")
    os.mkfifo(ds / "manifest.json")
    with pytest.raises(FormatError, match=r"manifest: expected a regular file.*§8 R4"):
        opens(ds)


def test_r4_path_through_a_file(ds):
    edit(ds, lambda m: m["shards"][0]["files"]["tokens"].update(path="shard-00000/starts.npy/x"))
    with pytest.raises(FormatError, match=r"cannot stat file \(Not a directory\).*§8 R4"):
        opens(ds)


def test_r4_manifest_is_a_directory(ds):
    (ds / "manifest.json").unlink()
    (ds / "manifest.json").mkdir()
    with pytest.raises(FormatError, match=r"manifest: expected a regular file, found a directory"):
        opens(ds)


# --- R5: sizes match the manifest ---------------------------------------------------------------
def test_r5_truncated_file(ds):
    p = ds / "shard-00000" / "tokens.npy"
    os.truncate(p, p.stat().st_size - 2)
    with pytest.raises(ChecksumError, match=r"tokens\.npy: shards\[0\]\.tokens\.bytes: file size differs from the manifest .*§8 R5"):
        opens(ds)
    assert "§8 R5" in problems(ds) and "§8 R12" in problems(ds)


def test_r5_swapped_shard_files_of_different_sizes(tmp_path):
    root = make(tmp_path / "ds", PAIRS + [([1], [2], [3])], shard_bytes=16)
    assert len(manifest(root)["shards"]) >= 2
    a, b = root / "shard-00000" / "tokens.npy", root / "shard-00001" / "tokens.npy"
    assert a.stat().st_size != b.stat().st_size
    a.rename(tmp_path / "t"), b.rename(a), (tmp_path / "t").rename(b)
    with pytest.raises(ChecksumError, match=r"file size differs from the manifest.*§8 R5"):
        opens(root)


def test_r12_swapped_shard_files_of_equal_sizes(tmp_path):
    # same sizes: only the checksums can tell, so open succeeds (in-bounds) and verify reports it
    root = make(tmp_path / "ds", [([1, 2], [3], [4]), ([5, 6], [7], [8])], shard_bytes=8)
    a, b = root / "shard-00000" / "tokens.npy", root / "shard-00001" / "tokens.npy"
    a.rename(tmp_path / "t"), b.rename(a), (tmp_path / "t").rename(b)
    d = opens(root)
    assert d[0].prompt.tolist() == [5, 6]  # the swapped bytes, read safely
    report = d.verify()
    assert len(report) == 2 and all("checksum mismatch" in p and "§8 R12" in p for p in report)


# --- R6: .npy header parse and caps -------------------------------------------------------------
def _tokens(ds: Path) -> Path:
    return ds / "shard-00000" / "tokens.npy"


def _replace_header(ds: Path, header: str, *, version: int = 1, pad_to: int = 64) -> None:
    p = _tokens(ds)
    data = p.read_bytes()[fmt.NPY_HEADER_BYTES:]
    p.write_bytes(raw_npy(header, data, version=version, pad_to=pad_to))
    _rehash(ds)


def test_r6_not_npy(ds):
    _tokens(ds).write_bytes(b"PK\x03\x04" + b"\0" * 200)
    _rehash(ds)
    with pytest.raises(FormatError, match=r"shards\[0\]\.tokens: not a \.npy file \(bad magic string\).*§8 R6"):
        opens(ds)


def test_r6_pickled_npy_is_never_unpickled(ds, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    arr = np.empty(3, dtype=object)
    arr[:] = [Evil(), Evil(), Evil()]
    np.save(_tokens(ds), arr, allow_pickle=True)
    _rehash(ds)
    with pytest.raises(FormatError, match=r"object or structured dtypes are not allowed.*§8 R6"):
        opens(ds)
    verify_dataset(ds)
    assert not marker.exists()


@pytest.mark.parametrize("descr, fortran, shape, match", [
    ("'<u2'", "True", "(11,)", r"arrays must be C order"),
    ("'>u2'", "False", "(11,)", r"arrays must be little-endian"),
    ("[('a', '<u2')]", "False", "(11,)", r"object or structured dtypes are not allowed"),
    ("('<u2', (2,))", "False", "(11,)", r"object or structured dtypes are not allowed"),
])
def test_r6_refused_layouts(ds, descr, fortran, shape, match):
    _replace_header(ds, "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape))
    with pytest.raises(FormatError, match=match + r".*§8 R6"):
        opens(ds)


@pytest.mark.parametrize("header", ["{'descr': '<u2', 'fortran_order': False}",
                                    "{'descr': '<u2', 'fortran_order': False, 'shape': (1,), 'x': 1}",
                                    "__import__('os').system('true')", "((((((((((((((((((((",
                                    "{'descr': 'xyz', 'fortran_order': False, 'shape': (1,)}",
                                    "{'descr': '<u2', 'fortran_order': 'no', 'shape': (1,)}",
                                    "{'descr': '<u2', 'fortran_order': False, 'shape': (1.5,)}"])
def test_r6_bad_header_text(ds, header):
    _replace_header(ds, header)
    with pytest.raises(FormatError, match=r"shards\[0\]\.tokens: bad \.npy header.*§8 R6"):
        opens(ds)


def test_r6_header_longer_than_cap_is_not_read(ds):
    # version 2.0 lets a header claim 4 GiB: refused from the 4-byte length alone
    p = _tokens(ds)
    p.write_bytes(fmt.NPY_MAGIC + b"\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{" * 64)
    _rehash(ds)
    with pytest.raises(FormatError, match=r"truncated or over-long \.npy header .*4294967280.*§8 R6"):
        opens(ds)
    _replace_header(ds, "{'descr': '<u2', 'fortran_order': False, 'shape': (21,), }" + " " * 5000)
    with pytest.raises(FormatError, match=r"truncated or over-long \.npy header.*§8 R6"):
        opens(ds)


def test_r6_unsupported_npy_version(ds):
    _replace_header(ds, "{'descr': '<u2', 'fortran_order': False, 'shape': (21,), }", version=3)
    with pytest.raises(FormatError, match=r"unsupported \.npy version .*'3\.0'.*§8 R6"):
        opens(ds)


def test_r6_misaligned_data(ds):
    _replace_header(ds, "{'descr': '<u2', 'fortran_order': False, 'shape': (21,), }", pad_to=16)
    with pytest.raises(FormatError, match=r"array data must start at a multiple of 64 bytes.*§8 R6"):
        opens(ds)


def test_r6_npy_v2_header_is_accepted(ds):
    _replace_header(ds, "{'descr': '<u2', 'fortran_order': False, 'shape': (21,), }", version=2)
    assert opens(ds)[2].prompt.tolist() == [15, 16]


# --- R7: dtype and shape -----------------------------------------------------------------------
def test_r7_wrong_dtype(ds):
    write_array(ds, "shard-00000/starts.npy", np.asarray(manifest_starts(ds), dtype="<i4"))
    with pytest.raises(FormatError, match=r"shards\[0\]\.starts: wrong dtype \(expected 'int64', got 'int32'\).*§8 R7"):
        opens(ds)


def manifest_starts(ds: Path) -> np.ndarray:
    return np.load(ds / "shard-00000" / "starts.npy", allow_pickle=False)


def test_r7_wrong_shape(ds):
    write_array(ds, "shard-00000/lengths.npy", np.ones((3, 2), dtype="<i8"))
    with pytest.raises(FormatError, match=r"shards\[0\]\.lengths: wrong shape \(expected \[3, 3\], got \[3, 2\]\).*§8 R7"):
        opens(ds)


def test_r7_header_claiming_huge_shape(ds):
    # header and manifest both claim 2**62 tokens; the file holds 11: never mapped or allocated
    _replace_header(ds, "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % 2**62)
    edit(ds, lambda m: m["shards"][0].update(num_tokens=2**62))
    tracemalloc.start()
    with pytest.raises(FormatError, match=r"file size does not match header \+ data .*9223372036854775936.*§8 R8"):
        opens(ds)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_r7_column_sized_to_pair_count(tmp_path):
    root = make(tmp_path / "ds", columns={"score": ("float32", [1.0, 2.0, 3.0])})
    write_array(root, "shard-00000/score.npy", np.zeros(2, dtype="<f4"))
    with pytest.raises(FormatError, match=r"shards\[0\]\.columns\.score: wrong shape \(expected \[3\], got \[2\]\).*§8 R7"):
        opens(root)


# --- R8: exact file size -----------------------------------------------------------------------
def test_r8_trailing_bytes(ds):
    with open(_tokens(ds), "ab") as f:
        f.write(b"\0\0")
    _rehash(ds)  # the manifest agrees with the file: only R8 can catch the extra bytes
    with pytest.raises(FormatError, match=r"shards\[0\]\.tokens: file size does not match header \+ data \(expected 170, got 172\).*§8 R8"):
        opens(ds)


# --- R9: num_pairs is the sum over shards -----------------------------------------------------------
def test_r9_num_pairs(ds):
    edit(ds, lambda m: m.update(num_pairs=4))
    with pytest.raises(FormatError, match=r"num_pairs: num_pairs differs from the sum over shards \(expected 3, got 4\).*§8 R9"):
        opens(ds)


# --- R9: manifest field types and ranges; R10: column declarations; R11: shard names and keys --
@pytest.mark.parametrize("rule, change, match", [
    ("R9", lambda m: m.update(num_pairs="3"), r"num_pairs: wrong type"),
    ("R9", lambda m: m.update(num_pairs=True), r"num_pairs: wrong type"),
    ("R9", lambda m: m.update(num_pairs=-1), r"num_pairs: out of range"),
    ("R9", lambda m: m.update(vocab_size=2**32 + 1), r"vocab_size: out of range"),
    ("R9", lambda m: m.update(token_dtype="uint32"), r"token_dtype: token_dtype does not match vocab_size"),
    ("R9", lambda m: m.update(token_dtype="int8"), r"token_dtype: token_dtype must be uint16 or uint32"),
    ("R9", lambda m: m.update(pad_id=32), r"pad_id: out of range \[0, 31\]"),
    ("R9", lambda m: m.update(bos_id=-1), r"bos_id: out of range"),
    ("R9", lambda m: m.update(tokenizer=[1]), r"tokenizer: must be an object or null"),
    ("R9", lambda m: m["shards"][0].update(num_tokens=2**63), r"num_tokens: out of range"),
    ("R9", lambda m: m["shards"][0].update(num_prompts=4), r"num_prompts: out of range \[0, 3\]"),
    ("R9", lambda m: m["shards"][0]["files"]["tokens"].update(xxh3_128="0" * 31 + "g"), r"checksum must be 32 lowercase hex"),
    ("R9", lambda m: m["shards"][0]["files"]["tokens"].update(bytes=-5), r"tokens\.bytes: out of range"),
    ("R9", lambda m: m.pop("shards"), r"shards: missing required key"),
    ("R2", lambda m: m.update(checksum="md5"), r"checksum: unknown checksum algorithm"),
    ("R10", lambda m: m["columns"].append({"name": "s", "dtype": "float32"}), r"shard columns must match the declared columns"),
    ("R10", lambda m: m["columns"].append({"name": "s", "dtype": "complex64"}), r"column dtype not allowed"),
    ("R10", lambda m: m["columns"].append({"name": "Bad-Name", "dtype": "float32"}), r"bad column name"),
    ("R10", lambda m: m["columns"].extend([{"name": "s", "dtype": "int32"}] * 2), r"duplicate column names"),
    ("R11", lambda m: m["shards"][0].update(name="shard-00000\n"), r"bad shard name"),
    ("R11", lambda m: m["shards"][0].update(name="../x"), r"bad shard name"),
    ("R11", lambda m: m["shards"][0]["files"].pop("lengths"), r"shard files must be exactly tokens, starts, lengths"),
])
def test_r9_r10_r11_manifest_fields(ds, rule, change, match):
    edit(ds, change)
    with pytest.raises(FormatError, match=match + rf".*\[FORMAT\.md §8 {rule}\]$"):
        opens(ds)


def test_r11_duplicate_shard_names(tmp_path):
    root = make(tmp_path / "ds", PAIRS + [([1], [2], [3])], shard_bytes=16)
    edit(root, lambda m: m["shards"][1].update(name=m["shards"][0]["name"]))
    with pytest.raises(FormatError, match=r"shards: duplicate shard names .*§8 R11"):
        opens(root)


# --- R17: segments stored in pair order without gaps; reused prompts are stored ones (verify) ------
def _index(ds: Path) -> tuple[np.ndarray, np.ndarray]:
    s = np.load(ds / "shard-00000" / "starts.npy", allow_pickle=False).copy()
    n = np.load(ds / "shard-00000" / "lengths.npy", allow_pickle=False).copy()
    return s, n


def test_r17_overlapping_segments_read_safely_but_reported(ds):
    s, n = _index(ds)
    s[2, 0] = s[1, 0]  # pair 0's rejected now overlaps its chosen: in bounds, so readable
    n[2, 0] = n[1, 0]
    write_array(ds, "shard-00000/starts.npy", s)
    write_array(ds, "shard-00000/lengths.npy", n)
    assert opens(ds)[0].rejected.tolist() == [8, 9, 2]
    assert re.search(r"segments are not stored in pair order without gaps \(\d+ pair\(s\) out of order; first: pair 0.*§8 R17",
                     problems(ds))


def test_r17_trailing_unreferenced_tokens(ds):
    t = np.load(_tokens(ds), allow_pickle=False)
    write_array(ds, "shard-00000/tokens.npy", np.concatenate([t, [3, 3]]).astype("<u2"))
    edit(ds, lambda m: m["shards"][0].update(num_tokens=len(t) + 2))
    _rehash(ds)
    assert len(opens(ds)) == 3
    assert re.search(r"the last segment ends at 21, tokens hold 23.*§8 R17", problems(ds))


def test_r17_reused_prompt_with_other_length(ds):
    s, n = _index(ds)
    n[0, 1] = 2  # pair 1 reuses pair 0's prompt start but claims 2 of its 3 tokens
    write_array(ds, "shard-00000/lengths.npy", n)
    assert opens(ds)[1].prompt.tolist() == [5, 6]
    assert re.search(r"1 reused prompt\(s\) do not match a stored prompt; first: pair 1.*§8 R17", problems(ds))


# --- R12: checksums (verify) -------------------------------------------------------------------
def test_r12_flipped_byte(ds):
    p = _tokens(ds)
    b = bytearray(p.read_bytes())
    b[-2] ^= 1  # low byte of the last token: still < vocab_size, so only the checksum can tell
    p.write_bytes(bytes(b))
    d = opens(ds)  # same size: open is O(1) and does not hash
    (msg,) = d.verify()
    assert re.search(r"tokens\.npy: shards\[0\]\.tokens: checksum mismatch \(expected '[0-9a-f]{32}', got '[0-9a-f]{32}'\).*§8 R12", msg)
    assert d.verify(checksums=False) == []


# --- R13: segment bounds and lengths >= 1 (every read, and verify) -----------------------------------
@pytest.mark.parametrize("row, col, field, value", [
    (1, 0, "starts", 10_000), (0, 2, "starts", -1), (2, 1, "lengths", 0), (1, 2, "lengths", 2**62),
    (0, 0, "starts", -2**63), (2, 2, "starts", 2**63 - 1)])
def test_r13_segment_out_of_bounds(ds, row, col, field, value, backend):
    s, n = _index(ds)
    (s if field == "starts" else n)[row, col] = value
    write_array(ds, f"shard-00000/{field}.npy", s if field == "starts" else n)
    d = opens(ds)  # O(1) open does not scan the index ...
    msg = rf"pair {col}: {fmt.SEGMENTS[row]} segment \[start -?\d+, length -?\d+\) is not inside tokens \[0, 21\) or is empty.*§8 R13"
    with pytest.raises(FormatError, match=msg):  # ... but every read checks what it uses
        d[col]
    with pytest.raises(FormatError, match=msg):
        d.batch([0, 1, 2])
    assert re.search(r"1 segment\(s\) outside tokens \[0, 21\) or empty; first: pair %d.*§8 R13" % col, problems(ds))
    good = [i for i in range(3) if i != col]
    assert len(d.batch(good)) == 2  # the sound pairs stay readable


# --- R14: ids below vocab_size (verify) ----------------------------------------------------------
def test_r14_id_not_below_vocab(ds):
    t = np.load(_tokens(ds), allow_pickle=False).copy()
    t[4] = 32
    write_array(ds, "shard-00000/tokens.npy", t)
    assert re.search(r"token id >= vocab_size \(expected '< 32', got 32\).*§8 R14", problems(ds))
    assert opens(ds).verify(checksums=False) == opens(ds).verify()  # same answer with or without hashing


# --- R15: num_prompts (verify) -------------------------------------------------------------------
def test_r15_num_prompts(ds):
    edit(ds, lambda m: m["shards"][0].update(num_prompts=3))
    assert re.search(r"num_prompts: num_prompts differs from the distinct prompt starts \(expected 2, got 3\).*§8 R15",
                     problems(ds))


# --- R16: finite column values (verify) ----------------------------------------------------------
def test_r16_non_finite_column(tmp_path):
    root = make(tmp_path / "ds", columns={"score": ("float32", [1.0, 2.0, 3.0])})
    write_array(root, "shard-00000/score.npy", np.array([1.0, np.nan, np.inf], dtype="<f4"))
    assert re.search(r"columns\.score: 2 non-finite value\(s\); first at pair 1: nan.*§8 R16", problems(root))


# --- foreign inputs ------------------------------------------------------------------------------
def test_foreign_directory_and_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FormatError, match=r"manifest\.json is missing: not a pairpack dataset"):
        pairpack.open(tmp_path / "d")
    (tmp_path / "f.bin").write_bytes(os.urandom(100))
    with pytest.raises(FormatError, match=r"f\.bin: manifest: not a dataset directory"):
        pairpack.open(tmp_path / "f.bin")
    with pytest.raises(FormatError, match=r"not a dataset directory"):
        pairpack.open(tmp_path / "missing")


def test_verify_reports_every_problem(tmp_path):
    """A dataset with three unrelated problems in two shards: verify names all three."""
    root = make(tmp_path / "ds", PAIRS + [([1], [2], [3])], shard_bytes=16)
    (root / "shard-00001" / "lengths.npy").unlink()  # R4 in shard 1
    p = _tokens(root)
    b = bytearray(p.read_bytes())
    b[-2] ^= 1  # R12 in shard 0 (a low byte: the id stays below vocab_size)
    p.write_bytes(bytes(b))
    edit(root, lambda m: m["shards"][0].update(num_prompts=0 if m["shards"][0]["num_prompts"] else 1))  # R15
    report = verify_dataset(root)
    text = "\n".join(report)
    assert len(report) == 3 and all(k in text for k in ("§8 R4", "§8 R12", "§8 R15")), report


def test_damaged_reads_raise_only_pairpack_errors_under_python_O(ds):
    """Validation is not `assert`: it holds with assertions compiled out (python -O)."""
    p = _tokens(ds)
    os.truncate(p, 10)
    code = ("import pairpack, sys\n"
            "try:\n    pairpack.open(sys.argv[1])\nexcept pairpack.FormatError as e:\n    print('refused', e.section)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code, str(ds)], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "refused §8 R5", out.stderr


def test_no_assert_used_for_validation():
    """`assert` vanishes under -O: only internal invariants, marked as such, may use it."""
    bad = []
    for path in sorted((ROOT / "pairpack").glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Assert) and "internal invariant" not in lines[node.lineno - 1]:
                bad.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "assert used outside internal invariants:\n" + "\n".join(bad)


def test_errors_are_typed_and_carry_fields(ds):
    os.truncate(_tokens(ds), 64)
    with pytest.raises(PairpackError) as ei:
        opens(ds)
    e = ei.value
    assert isinstance(e, ChecksumError) and isinstance(e, ValueError)
    assert (e.field, e.expected, e.actual, e.section) == ("shards[0].tokens.bytes", 170, 64, "§8 R5")
    assert e.path.endswith("tokens.npy")

