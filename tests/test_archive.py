"""pairpack pack / unpack: byte-identical round trips, every damage refused, nothing left behind."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pairpack
from pairpack.ops import archive as archive
from pairpack.errors import ChecksumError, DatasetExistsError, FormatError, NotReplaceableError, PairpackError

from .conftest import run_cli


# --- helpers -----------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(path: Path, pairs: list[tuple[list[int], list[int], list[int]]], *, shard_bytes: int = 1 << 30,
           score: bool = False) -> pairpack.Dataset:
    cols = {"score": "float32"} if score else None
    with pairpack.Writer(path, vocab_size=300, pad_id=0, shard_bytes=shard_bytes, columns=cols) as w:
        for i, (p, c, r) in enumerate(pairs):
            w.add(p, c, r, **({"score": float(i) / 3} if score else {}))
    return pairpack.open(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A 3-shard dataset with a column and shared prompts."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(60):
        p = [1 + i % 7] * int(rng.integers(1, 9))
        pairs.append((p, rng.integers(0, 300, rng.integers(1, 30)).tolist(),
                      rng.integers(0, 300, rng.integers(1, 30)).tolist()))
    root = tmp_path_factory.mktemp("arch") / "ds"
    _write(root, pairs, shard_bytes=1200, score=True)
    return root


@pytest.fixture(scope="module")
def packed(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arch") / "ds.pairpack.zst"
    archive.pack(small, out)
    return out


def _unchanged_parent(parent: Path, fn) -> PairpackError:
    """Run ``fn`` expecting a PairpackError; check it left nothing in ``parent``."""
    before = sorted(os.listdir(parent))
    with pytest.raises(PairpackError) as ei:
        fn()
    assert sorted(os.listdir(parent)) == before, "unpack left files behind"
    return ei.value


def _craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], *, trailer: bool = True) -> Path:
    """A hostile archive: arbitrary tar members in one zstd frame, with a valid pairpack trailer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(buf.getvalue())
    tail = archive._TRAILER.pack(archive.TRAILER_MAGIC, archive._TRAILER.size - 8, archive.TRAILER_TAG,
                                 len(frame), xxhash.xxh3_128_digest(frame)) if trailer else b""
    path.write_bytes(frame + tail)
    return path


def _info(name: str, size: int = 0, type_: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.size, i.type, i.linkname = size, type_, link
    return i


def _real_members(arch: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    raw = arch.read_bytes()
    frame = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    out = []
    with tarfile.open(fileobj=io.BytesIO(frame), mode="r:") as t:
        for m in t.getmembers():
            out.append((m, t.extractfile(m).read()))
    return out


# --- round trips ----------------------------------------------------------------------------------------
def test_pack_unpack_byte_identical(small, packed, tmp_path):
    out = tmp_path / "back"
    report = archive.unpack(packed, out)
    assert _files(out) == _files(small)
    ds = pairpack.open(out)
    assert ds.verify() == []
    assert ds.fingerprint == pairpack.open(small).fingerprint
    m = pairpack.open(small).manifest
    data = sum(e.bytes for s in m.shards for e in list(s.files.values()) + list(s.columns.values()))
    assert report.data_bytes == data + (small / "manifest.json").stat().st_size
    assert report.archive_bytes == packed.stat().st_size and report.num_pairs == 60


def test_archive_is_a_plain_tar_stream_in_zstd(small, packed):
    """`zstd -dc F | tar x` works: the frame holds an ordinary tar stream, header first, and the
    trailer is a skippable frame that stock decoders pass over."""
    members = _real_members(packed)
    names = [m.name for m, _ in members]
    assert names[:2] == [archive.HEADER_NAME, "manifest.json"]
    assert set(names[1:]) == set(_files(small))
    assert all(m.isfile() and m.mtime == 0 for m, _ in members)
    header = json.loads(members[0][1])
    assert [e["path"] for e in header["members"]] == names[1:]
    for (m, data), e in zip(members[1:], header["members"]):
        assert xxhash.xxh3_128_hexdigest(data) == e["xxh3_128"] and len(data) == e["bytes"]
    # a stock streaming decoder reads through the trailer (skippable frame) without complaint
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed.read_bytes()), read_across_frames=True) as r:
        assert len(r.read()) >= sum(len(d) for _, d in members)


pair_st = st.tuples(st.lists(st.integers(0, 299), min_size=1, max_size=8),
                    st.lists(st.integers(0, 299), min_size=1, max_size=12),
                    st.lists(st.integers(0, 299), min_size=1, max_size=12))


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pairs=st.lists(pair_st, min_size=0, max_size=25), shard_bytes=st.sampled_from([1 << 30, 40]),
       score=st.booleans())
@example(pairs=[], shard_bytes=1 << 30, score=False)
def test_roundtrip_any_dataset(tmp_path, pairs, shard_bytes, score):
    import shutil
    import uuid

    d = tmp_path / uuid.uuid4().hex
    _write(d / "src", pairs, shard_bytes=shard_bytes, score=score)
    archive.pack(d / "src", d / "a.pairpack.zst", level=1)
    archive.unpack(d / "a.pairpack.zst", d / "dst")
    assert _files(d / "dst") == _files(d / "src")
    assert pairpack.open(d / "dst").verify() == []
    shutil.rmtree(d)


def test_force_and_exists(small, packed, tmp_path):
    out = tmp_path / "x"
    archive.unpack(packed, out)
    with pytest.raises(DatasetExistsError):
        archive.unpack(packed, out)
    (out / "marker").write_text("old")  # a file of the user's: --force must not delete it (§9 W8)
    with pytest.raises(NotReplaceableError, match="marker"):
        archive.unpack(packed, out, force=True)
    assert (out / "marker").read_text() == "old"
    (out / "marker").unlink()
    archive.unpack(packed, out, force=True)
    assert _files(out) == _files(small)
    with pytest.raises(DatasetExistsError):
        archive.pack(small, packed)
    assert sorted(os.listdir(tmp_path)) == ["x"]


def test_member_paths_over_100_bytes_roundtrip(small, tmp_path):
    """Paths longer than a tar name field travel as GNU long-name members (shard names may be long)."""
    import shutil

    src = tmp_path / "long"
    shutil.copytree(small, src)
    long_name = "shard-" + "0" * 120
    (src / "shard-00000").rename(src / long_name)
    man = src / "manifest.json"
    man.write_bytes(man.read_bytes().replace(b'"shard-00000', f'"{long_name}'.encode()))
    assert pairpack.open(src).verify() == []
    archive.pack(src, tmp_path / "long.zst")
    names = [m.name for m, _ in _real_members(tmp_path / "long.zst")]
    assert f"{long_name}/tokens.npy" in names
    archive.unpack(tmp_path / "long.zst", tmp_path / "back")
    assert _files(tmp_path / "back") == _files(src)


# --- damage -------------------------------------------------------------------------------------------
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@example(data=None)  # the last byte (inside the trailer's checksum)
def test_any_flipped_byte_fails_cleanly(packed, tmp_path, data):
    raw = bytearray(packed.read_bytes())
    pos = len(raw) - 1 if data is None else data.draw(st.integers(0, len(raw) - 1), label="pos")
    bit = 0 if data is None else data.draw(st.integers(0, 7), label="bit")
    raw[pos] ^= 1 << bit
    bad = tmp_path / "bad.zst"
    bad.write_bytes(bytes(raw))
    target = tmp_path / "out"
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, target))
    assert str(bad) in str(err)
    assert not target.exists()


@pytest.mark.parametrize("keep", [-1, -4, -36, -37, -500, 40, 3])
def test_truncated_archive_fails_cleanly(packed, tmp_path, keep):
    raw = packed.read_bytes()
    bad = tmp_path / "cut.zst"
    bad.write_bytes(raw[:keep])
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert isinstance(err, FormatError)
    assert "truncated" in str(err) or "not a zstandard file" in str(err)


def test_appended_bytes_and_not_an_archive(packed, tmp_path):
    bad = tmp_path / "more.zst"
    bad.write_bytes(packed.read_bytes() + b"\0" * 8)
    _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    txt = tmp_path / "plain.json"
    txt.write_text("{}")
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(txt, tmp_path / "out"))
    assert "not a zstandard file" in str(err)


def test_existing_target_untouched_by_failed_unpack(small, packed, tmp_path):
    out = tmp_path / "ds"
    archive.unpack(packed, out)
    before = _files(out)
    raw = bytearray(packed.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.zst"
    bad.write_bytes(bytes(raw))
    _unchanged_parent(tmp_path, lambda: archive.unpack(bad, out, force=True))
    assert _files(out) == before


# --- hostile archives (well-formed compression, malicious content) --------------------------------------
def test_refuses_symlink_device_and_traversal_members(packed, tmp_path):
    members = _real_members(packed)
    header, manifest = members[0], members[1]
    cases = {
        "symlink": [header, (_info("manifest.json", 0, tarfile.SYMTYPE, "/etc/passwd"), b"")],
        "hardlink": [header, (_info("manifest.json", 0, tarfile.LNKTYPE, "../x"), b"")],
        "device": [header, (_info("manifest.json", 0, tarfile.CHRTYPE), b"")],
        "directory": [header, (_info("shard-00000", 0, tarfile.DIRTYPE), b"")],
        "wrong name": [header, (_info("../manifest.json", len(manifest[1])), manifest[1])],
        "no header": [manifest],
    }
    for what, mem in cases.items():
        bad = _craft(tmp_path / f"{what}.zst", mem)
        err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
        assert isinstance(err, FormatError), what
    assert not (tmp_path.parent / "passwd").exists()


def test_refuses_traversal_in_header_and_tampered_manifest(packed, tmp_path):
    members = _real_members(packed)
    hinfo, hdata = members[0]
    header = json.loads(hdata)
    evil = dict(header, members=[header["members"][0], {"path": "../evil.npy", "bytes": 1, "xxh3_128": "0" * 32}])
    data = json.dumps(evil).encode()
    bad = _craft(tmp_path / "trav.zst", [(_info(archive.HEADER_NAME, len(data)), data), members[1],
                                         (_info("../evil.npy", 1), b"x")])
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert "'..'" in str(err) or ".." in str(err)
    assert not (tmp_path / "evil.npy").exists()

    # the manifest changed after packing (trailer recomputed): its header checksum catches it
    minfo, mdata = members[1]
    tampered = mdata.replace(b'"pad_id": 0', b'"pad_id": 1')
    assert tampered != mdata
    bad = _craft(tmp_path / "tamper.zst", [members[0], (_info("manifest.json", len(tampered)), tampered)]
                 + members[2:])
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert isinstance(err, ChecksumError) and "manifest.json" in str(err)

    # a member list that leaves out a file the manifest needs
    short = dict(header, members=header["members"][:-1])
    data = json.dumps(short).encode()
    bad = _craft(tmp_path / "short.zst", [(_info(archive.HEADER_NAME, len(data)), data)] + members[1:-1])
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert "differ from the files the manifest lists" in str(err)

    # an extra member beyond the header's list
    bad = _craft(tmp_path / "extra.zst", members + [(_info("notes.txt", 2), b"hi")])
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert "does not list" in str(err)

    # data hidden after the end-of-archive marker (inside the frame, trailer valid)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, d in members:
            t.addfile(info, io.BytesIO(d))
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(buf.getvalue() + b"secret")
    bad = tmp_path / "hidden.zst"
    bad.write_bytes(frame + archive._TRAILER.pack(archive.TRAILER_MAGIC, archive._TRAILER.size - 8,
                                                   archive.TRAILER_TAG, len(frame), xxhash.xxh3_128_digest(frame)))
    err = _unchanged_parent(tmp_path, lambda: archive.unpack(bad, tmp_path / "out"))
    assert "after the end of the archive" in str(err)


def test_pack_refuses_a_damaged_dataset(small, tmp_path):
    import shutil

    src = tmp_path / "ds"
    shutil.copytree(small, src)
    tok = next(src.glob("shard-*/tokens.npy"))
    raw = bytearray(tok.read_bytes())
    raw[-1] ^= 1
    tok.write_bytes(bytes(raw))
    out = tmp_path / "x.pairpack.zst"
    with pytest.raises(ChecksumError) as ei:
        archive.pack(src, out)
    assert "tokens.npy" in str(ei.value)
    assert sorted(os.listdir(tmp_path)) == ["ds"]


# --- CLI ------------------------------------------------------------------------------------------------
def test_cli_pack_unpack_report_and_errors(small, tmp_path):
    arch = tmp_path / "s.pairpack.zst"
    r = run_cli("pack", small, "-o", arch)
    assert r.returncode == 0, r.stderr
    assert "ratio" in r.stdout and "MB/s" in r.stdout
    r = run_cli("unpack", arch, "-o", tmp_path / "back", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["num_pairs"] == 60 and rep["ratio"] > 1 and rep["mb_per_s"] > 0
    assert _files(tmp_path / "back") == _files(small)
    r = run_cli("unpack", arch, "-o", tmp_path / "back")
    assert r.returncode == 1 and "already exists" in r.stderr
    raw = bytearray(arch.read_bytes())
    raw[100] ^= 0x10
    arch.write_bytes(bytes(raw))
    r = run_cli("unpack", arch, "-o", tmp_path / "again")
    assert r.returncode == 1 and r.stderr.startswith("pairpack: error:") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "again").exists()


def test_tokenizer_copy_travels_with_the_archive(shared_dir, tmp_path):
    """A dataset built with a Hugging Face tokenizer keeps its tokenizer.json copy (manifest
    tokenizer.file) through pack/unpack, so the unpacked dataset verifies and decodes."""
    pytest.importorskip("tokenizers")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello there", "chosen": " world", "rejected": " moon"}) + "\n")
    pairpack.build([src], tmp_path / "ds", tokenizer=str(shared_dir / "tokenizers" / "gpt2.tokenizer.json"))
    assert (tmp_path / "ds" / "tokenizer.json").is_file()
    archive.pack(tmp_path / "ds", tmp_path / "ds.pairpack.zst")
    archive.unpack(tmp_path / "ds.pairpack.zst", tmp_path / "back")
    for p in (tmp_path / "ds").rglob("*"):
        if p.is_file():
            assert (tmp_path / "back" / p.relative_to(tmp_path / "ds")).read_bytes() == p.read_bytes()
    ds = pairpack.open(tmp_path / "back")
    assert ds.verify() == []
    assert ds.decode(ds[0].chosen).startswith(" world")
