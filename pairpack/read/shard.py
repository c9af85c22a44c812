"""One shard opened for reading: its arrays memory-mapped after the open-time checks (FORMAT.md §8 R3-R8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import format as fmt
from ..errors import FormatError


@dataclass
class _Shard:
    info: fmt.ShardInfo
    tokens: np.ndarray  # (T,) token dtype
    starts: np.ndarray  # (3, n) int64
    lengths: np.ndarray  # (3, n) int64
    columns: dict[str, np.ndarray]
    dir: Path



def _open_shard(root: Path, m: fmt.Manifest, i: int) -> _Shard:
    """Map shard ``i``'s files after the open-time checks (FORMAT.md §8 R3-R8)."""
    s = m.shards[i]
    where = f"shards[{i}]"
    f = {k: fmt.resolve_file(root, s.files[k].path) for k in fmt.INDEX_FILES}
    tokens = fmt.open_array(f["tokens"], f"{where}.tokens", dtype=fmt.TOKEN_DTYPES[m.token_dtype],
                            shape=(s.num_tokens,), expected_bytes=s.files["tokens"].bytes)
    starts = fmt.open_array(f["starts"], f"{where}.starts", dtype=fmt.INDEX_DTYPE,
                            shape=(3, s.num_pairs), expected_bytes=s.files["starts"].bytes)
    lengths = fmt.open_array(f["lengths"], f"{where}.lengths", dtype=fmt.INDEX_DTYPE,
                             shape=(3, s.num_pairs), expected_bytes=s.files["lengths"].bytes)
    cols = {}
    for c in m.columns:
        e = s.columns[c.name]
        cols[c.name] = fmt.open_array(fmt.resolve_file(root, e.path), f"{where}.columns.{c.name}",
                                      dtype=fmt.COLUMN_DTYPES[c.dtype], shape=(s.num_pairs,),
                                      expected_bytes=e.bytes)
    return _Shard(s, tokens, starts, lengths, cols, root / s.name)


def _check_segments(shard: _Shard, starts: np.ndarray, lengths: np.ndarray, local: Any) -> None:
    """Raise FormatError unless every segment lies inside the shard's tokens (FORMAT.md §8 R13)."""
    t = shard.tokens.shape[0]
    bad = (starts < 0) | (lengths < 1) | (starts > t) | (lengths > t - starts)
    if bad.any():
        seg, col = np.argwhere(bad)[0]
        j = int(np.asarray(local).reshape(-1)[col])
        raise FormatError(
            f"pair {j}: {fmt.SEGMENTS[seg]} segment [start {int(starts[seg, col])}, length "
            f"{int(lengths[seg, col])}) is not inside tokens [0, {t}) or is empty",
            path=shard.dir, field=f"starts/lengths[{seg}, {j}]", section="§8 R13")
