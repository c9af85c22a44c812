"""Prompt identity by token ids: a 64-bit key per pair (xxh3-64 of its prompt's token bytes), so
pairs whose prompts hold the same ids share a key whether the build stored the prompt once
(§7.2) or several times (written twice in the source, or in other shards). Used by splits
(FORMAT.md §5.6, verify R19) and by the overlap between datasets.

Each distinct prompt segment of a shard is hashed once (a segment shared by many pairs, e.g. the
pairs of one multi-completion record, is read once); the work is O(prompt tokens stored) and the
memory O(pairs): int64 starts and uint64 keys, no gathered token copies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

from .. import format as fmt
from .shard import _check_segments, _Shard

__all__ = ["prompt_keys", "segment_keys"]


def segment_keys(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 ``(K,)``: xxh3-64 of ``tokens[starts[k]:starts[k] + lengths[k]]`` as little-endian
    bytes of the tokens' dtype. The caller has checked the segments lie inside ``tokens``."""
    buf = memoryview(np.ascontiguousarray(tokens)).cast("B")
    w = tokens.dtype.itemsize
    h = xxhash.xxh3_64_intdigest
    a = (np.asarray(starts, dtype=np.int64) * w).tolist()
    b = ((np.asarray(starts, dtype=np.int64) + np.asarray(lengths, dtype=np.int64)) * w).tolist()
    return np.fromiter((h(buf[x:y]) for x, y in zip(a, b)), dtype=np.uint64, count=len(a))


def prompt_keys(shards: Sequence[_Shard]) -> np.ndarray:
    """uint64 ``(N,)``: the prompt key of every pair of ``shards`` in order (equal ids, equal key;
    two different prompts share a key with probability about ``2**-64`` per pair of prompts).

    Raises FormatError (§8 R13) when a prompt segment is not inside its shard's tokens.
    """
    parts = []
    for sh in shards:
        ps = np.asarray(sh.starts[fmt.PROMPT])
        pl = np.asarray(sh.lengths[fmt.PROMPT])
        if not len(ps):
            parts.append(np.zeros(0, dtype=np.uint64))
            continue
        _check_segments(sh, ps[None, :], pl[None, :], np.arange(len(ps)))
        # one hash per distinct (start, length): a prompt stored once is hashed once
        key = np.stack([ps, pl])
        uniq, inv = np.unique(key, axis=1, return_inverse=True)
        parts.append(segment_keys(sh.tokens, uniq[0], uniq[1])[inv.reshape(-1)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
