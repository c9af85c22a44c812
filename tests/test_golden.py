"""The worked example of spec/FORMAT.md §10: golden bytes, spec text, and the appendix reader."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import pairpack
from pairpack import format as fmt

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "FORMAT.md"
GOLDEN = ROOT / "spec" / "examples" / "tiny"
sys.path.insert(0, str(ROOT / "tools"))
import make_golden  # noqa: E402


def _spec() -> str:
    return SPEC.read_text(encoding="utf-8")


def _section(title_re: str) -> str:
    text = _spec()
    m = re.search(title_re, text, flags=re.M)
    assert m, title_re
    nxt = re.search(r"^## ", text[m.end():], flags=re.M)
    return text[m.end(): m.end() + nxt.start()] if nxt else text[m.end():]


def _golden_files() -> list[Path]:
    return sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*") if p.is_file())


def test_writer_reproduces_golden_bytes(tmp_path):
    make_golden.write_example(tmp_path / "tiny")
    got = sorted(p.relative_to(tmp_path / "tiny") for p in (tmp_path / "tiny").rglob("*") if p.is_file())
    assert got == _golden_files()
    for rel in got:
        assert (tmp_path / "tiny" / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel


def test_golden_loads_and_equals_spec_table():
    ds = pairpack.open(GOLDEN)
    assert len(ds) == 3
    for i, (p, c, r) in enumerate(make_golden.PAIRS):
        pair = ds[i]
        assert pair.prompt.tolist() == p and pair.chosen.tolist() == c and pair.rejected.tolist() == r
        assert pair.prompt.dtype == np.uint16
    np.testing.assert_array_equal(ds.column("score"), np.array(make_golden.SCORES, dtype=np.float32))
    assert ds.manifest.shards[0].num_tokens == 21 and ds.manifest.shards[0].num_prompts == 2
    assert ds.verify() == []
    fp = re.search(r"Its fingerprint \(§7.3\) is `([0-9a-f]{32})`", _spec()).group(1)
    assert ds.fingerprint == fp


def test_spec_manifest_block_is_the_golden_manifest():
    sec = _section(r"^## 10\. Worked example")
    block = re.search(r"```json\n(.*?)```", sec, flags=re.S).group(1)
    assert block.encode("utf-8") == (GOLDEN / "manifest.json").read_bytes()


def test_spec_hex_dumps_match_golden_files():
    sec = _section(r"^## 10\. Worked example")
    for name in ("tokens", "starts", "lengths", "score"):
        m = re.search(rf"\*\*`shard-00000/{name}\.npy`\*\* \((\d+) bytes\).*?```\n(00000080:.*?)```", sec, flags=re.S)
        size, dump = int(m.group(1)), m.group(2)
        data = (GOLDEN / "shard-00000" / f"{name}.npy").read_bytes()
        assert len(data) == size
        got = b""
        for line in dump.strip().splitlines():
            off, rest = line.split(":", 1)
            hexpart = re.match(r"\s*((?:[0-9a-f]{4} ?|[0-9a-f]{2} ?)+)", rest).group(1)
            chunk = bytes.fromhex(hexpart.replace(" ", ""))
            assert int(off, 16) == fmt.NPY_HEADER_BYTES + len(got)
            got += chunk
        assert got == data[fmt.NPY_HEADER_BYTES:], name


def test_spec_batch_example():
    b = pairpack.open(GOLDEN).batch([0, 1, 2])
    assert b.preferred_seq.tolist() == [[5, 6, 7, 8, 9, 2, 0], [5, 6, 7, 11, 2, 0, 0], [15, 16, 17, 2, 0, 0, 0]]
    assert b.unpreferred_seq.tolist() == [[5, 6, 7, 10, 2, 0, 0], [5, 6, 7, 12, 13, 14, 2], [15, 16, 18, 19, 2, 0, 0]]
    assert b.prompt_mask.sum(1).tolist() == [3, 3, 2]
    assert b.preferred_seq_mask.sum(1).tolist() == [6, 5, 4]
    assert b.unpreferred_seq_mask.sum(1).tolist() == [5, 7, 5]


def _appendix_reader():
    sec = _section(r"^## Appendix A")
    code = re.search(r"```python\n(.*?)```", sec, flags=re.S).group(1)
    ns: dict = {}
    exec(compile(code, "FORMAT.md#appendix-a", "exec"), ns)
    return ns["read_pairs"]


def _pairs_via_pairpack(path: Path) -> list[tuple[list[int], ...]]:
    ds = pairpack.open(path)
    return [tuple(seg.tolist() for seg in ds[i]) for i in range(len(ds))]


def test_appendix_reader_agrees_on_golden():
    assert _appendix_reader()(str(GOLDEN)) == _pairs_via_pairpack(GOLDEN)


def test_appendix_reader_agrees_on_multishard_uint32(tmp_path):
    rng = np.random.default_rng(0)
    with pairpack.Writer(tmp_path / "d", shard_bytes=256) as w:
        prompt = [70000, 3]
        for i in range(40):
            if i % 3 == 0:
                prompt = rng.integers(0, 100_000, rng.integers(1, 9)).tolist()
            w.add(prompt, rng.integers(0, 100_000, rng.integers(1, 9)).tolist(),
                  rng.integers(0, 100_000, rng.integers(1, 9)).tolist())
    assert len(pairpack.open(tmp_path / "d").manifest.shards) > 1
    assert _appendix_reader()(str(tmp_path / "d")) == _pairs_via_pairpack(tmp_path / "d")


@pytest.mark.parametrize("text, value", [
    ("at most **64 MiB**", fmt.MANIFEST_MAX_BYTES == 64 * 2**20),
    ("exactly\n**128 bytes**", fmt.NPY_HEADER_BYTES == 128),
    ("multiple of **64** bytes", fmt.NPY_ALIGN == 64),
    ("at most 4,096 bytes", fmt.NPY_MAX_HEADER == 4096),
    ("MUST be `1`", fmt.FORMAT_VERSION == 1),
    ("`xxh3_128(b\"abc\") = 06b05ab6733a618578af5f94892f3950`", True),
])
def test_spec_states_the_code_constants(text, value):
    assert text in _spec()
    assert value


def test_checksum_test_vector(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert fmt.file_checksum(p) == "06b05ab6733a618578af5f94892f3950"


def test_constants_cite_spec_sections():
    src = (ROOT / "pairpack" / "format" / "spec.py").read_text()
    for line in src.splitlines():
        if re.match(r"^[A-Z][A-Z0-9_]+ = ", line) and not line.startswith("_"):
            assert "FORMAT.md §" in line, f"constant without a spec section: {line}"
