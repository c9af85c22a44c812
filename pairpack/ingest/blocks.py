"""Block processing (runs in workers): parse, shape, tokenize and check one block of records as a
whole (:func:`process_block`). Pre-tokenized blocks take a fast path (the C reader where it
applies); multi-completion blocks are :mod:`pairpack.ingest.multi_blocks`'s. Pure: a block's result
depends on the job and the block only, never on which process or thread runs it."""

from __future__ import annotations

import os
from array import array
from collections import Counter
from typing import Any, Callable

import numpy as np

from .. import _accel
from ..errors import SourceError
from ..write.writer import check_ids
from .job import _U32, BlockResult, _column_value, _Error, _Job, _seg_ids, _text_pair_ids, boundary_example
from .joins import encode_text_pairs
from .multi_blocks import _process_multi
from .shapes import make_extractor
from .sources import Block, block_records, record_text

__all__ = ["process_block"]


def process_block(job: _Job, extractor: Callable[[Any], tuple], block: Block) -> BlockResult:
    """Parse, shape, tokenize and check one block. Pure: the result depends on ``job`` and the
    block only (never on which process runs it)."""
    if job.multi is not None:
        return _process_multi(job, block_records(block), block.path)
    if _plain_ids(job):
        return _process_ids_fast(job, extractor, block)
    return _process_records(job, extractor, block_records(block), block.path)


def _plain_ids(job: _Job) -> bool:
    """Pre-tokenized ``fields`` records under plain (undotted) names, no BOS/EOS to add and no
    columns to keep: the inputs :func:`_process_ids_fast` (and its C reader) take."""
    spec = job.opts.spec
    return (job.mode == "ids" and job.opts.shape == "fields" and job.bos is None and job.eos is None
            and not job.columns and not any("." in n for n in (spec.prompt, spec.chosen, spec.rejected)))


def _process_ids_fast(job: _Job, extractor: Callable[[Any], tuple], block: Block) -> BlockResult:
    """Pre-tokenized ``fields`` records without BOS/EOS to add: the hot path of id builds.

    Same result as :func:`_process_records` (which it falls back to for any record or block that
    is not plainly valid), but the per-token work is one list extend and one C-level
    ``array('q', ...)`` conversion, which refuses floats, strings, None and ints beyond int64.
    Booleans (ints to Python) are excluded exactly: a JSONL block without ``true``/``false`` in its
    text cannot hold one; other records get a type check.
    """
    P, C, R = job.opts.spec.prompt, job.opts.spec.chosen, job.opts.spec.rejected
    nat = _accel.native
    if nat is not None and block.data is not None:
        got = _scan_native(nat, job, block, (P, C, R))
        if got is not None:
            return got
    flat: list[int] = []
    lens: list[tuple[int, int, int]] = []
    errors: list[tuple[int, str | None, str, str, str]] = []
    identical = dropped = nrec = 0
    drop = job.drop_identical
    # JSON text without true/false holds no booleans: one search per block instead of a type check per id
    no_bool = block.data is not None and b"true" not in block.data and b"false" not in block.data
    for rec in block_records(block):
        nrec += 1
        d = rec.data
        if type(d) is dict:
            p, c, r = d.get(P), d.get(C), d.get(R)
            if (type(p) is list and type(c) is list and type(r) is list and p and c and r
                    and (no_bool or set(map(type, p + c + r)) == {int})):
                if c == r:
                    identical += 1
                    if drop:
                        dropped += 1
                        continue
                flat += p
                flat += c
                flat += r
                lens.append((len(p), len(c), len(r)))
                continue
        one = _process_records(job, extractor, [rec], block.path)  # the exact path decides
        errors += one.errors
        identical += one.identical
        dropped += one.identical_dropped
        flat += one.tokens.tolist()
        lens += [tuple(x) for x in one.lengths.T.tolist()]
    try:
        tokens = np.frombuffer(array("q", flat), dtype=np.int64) if flat else np.zeros(0, np.int64)
    except (TypeError, OverflowError):  # a float, string, None or huge int somewhere: exact path
        return _process_records(job, extractor, block_records(block), block.path)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= job.limit):
        return _process_records(job, extractor, block_records(block), block.path)
    lengths = np.asarray(lens, dtype=np.int64).reshape(-1, 3).T.copy()
    return BlockResult(block.path, tokens.astype(np.uint32), lengths, errors, identical, dropped, nrec)


def _scan_native(nat: Any, job: _Job, block: Block, names: tuple[str, str, str]) -> BlockResult | None:
    """The JSONL block through the C reader (``_native.scan_ids``): ids parsed straight from the
    text into uint32, no Python object per id. None when any line needs the exact path (the C
    reader accepts only lines it is sure orjson and the exact path would read the same way)."""
    data = block.data or b""
    # capacities from the size alone: an id takes >= 2 bytes (a digit and , or ]), an accepted
    # record >= 24 ({"":[1],"a":[1],"b":[1]}); the C reader gives up rather than overrun them
    tokens = np.empty(len(data) // 2 + 1, dtype=np.uint32)
    lengths = np.empty((3, len(data) // 24 + 1), dtype=np.int64)
    got = nat.scan_ids(data, tuple(n.encode() for n in names), min(job.limit, _U32), job.drop_identical,
                       block.max_record_bytes, tokens, lengths)
    if got is None:
        return None
    ntok, npairs, nrec, identical, dropped = got
    return BlockResult(block.path, tokens[:ntok].copy(), lengths[:, :npairs].copy(), [], identical, dropped, nrec)


# (index into the block's shaped records, [prompt, chosen, rejected] ids)
_Ids = list[tuple[int, list[list[int]]]]




def _process_records(job: _Job, extractor: Callable[[Any], tuple], records: Any, path: str) -> BlockResult:
    """The general path of :func:`process_block` over an iterable of RawRecords: shape each record,
    tokenize the block's texts in two batches, add BOS/EOS, drop identical pairs if asked, and check
    the id range; invalid records become errors in input order."""
    recs, segs, cols, notes, errors = _shape_records(job, extractor, records)
    nrec = len(recs) + len(errors)
    good, bad, sides = _tokenize(job, segs)
    kept, identical, dropped = _add_specials(job, good)
    tokens, lens, kept = _pack(job, kept, bad)
    at_boundary = [k for k, _ in kept if k in sides]
    errors += [(recs[k].line, f, reason, msg, record_text(recs[k])) for k, (f, reason, msg) in bad.items()]
    errors.sort(key=lambda e: e[0])
    lengths = np.asarray(lens, dtype=np.int64).reshape(-1, 3).T.copy()
    columns = {c.name: np.asarray([cols[k][i] for k, _ in kept], dtype=c.dtype).reshape(-1)
               for i, c in enumerate(job.columns)}
    counts = Counter(notes[k] for k, _ in kept if notes[k])
    res = BlockResult(path, tokens.astype(np.uint32), lengths, errors, identical, dropped, nrec, columns, counts)
    if at_boundary:
        k = at_boundary[0]
        res.boundary_pairs = len(at_boundary)
        res.boundary_example = boundary_example(job, segs[k], sides[k], {"file": path, "line": recs[k].line})
    return res


def _shape_records(job: _Job, extractor: Callable[[Any], tuple], records: Any
                   ) -> tuple[list[Any], list[tuple], list[list[float]], list[str | None], list[_Error]]:
    """Each parsed record through the extractor: (records kept, their segments, their column
    values, their notes, errors of the others)."""
    errors: list[_Error] = []
    segs: list[tuple] = []
    cols: list[list[float]] = []
    recs = []
    notes: list[str | None] = []
    for rec in records:
        if rec.error is not None:
            errors.append((rec.line, None, rec.error.reason, rec.error.detail, record_text(rec)))
            continue
        try:
            s = extractor(rec.data)
            kinds = {isinstance(x, str) for x in s}
            if len(kinds) != 1:
                raise SourceError("mixes text and token ids between prompt/chosen/rejected", reason="mixed_types")
            if kinds.pop() != (job.mode == "text"):
                raise SourceError(f"record has {'text' if job.mode == 'ids' else 'token ids'} but this build reads "
                                  f"{job.mode} (fixed by the first records of the input)", reason="mixed_types")
            values = [_column_value(rec.data, c) for c in job.columns]
        except SourceError as e:
            errors.append((rec.line, e.field, e.reason, e.detail, record_text(rec)))
            continue
        notes.append(getattr(s, "note", None))
        segs.append(tuple(s))
        cols.append(values)
        recs.append(rec)
    return recs, segs, cols, notes, errors


def _tokenize(job: _Job, segs: list[tuple]
              ) -> tuple[_Ids, dict[int, tuple[str | None, str, str]], dict[int, int]]:
    """Ids of every record's segments, and the boundary sides of text pairs (pair -> bits, see
    :func:`pairpack.ingest.joins.encode_text_pairs`). Text is encoded in batches for the block,
    retried record by record when a batch fails so that the record at fault is named; id segments
    are taken as they are."""
    if not segs:
        return [], {}, {}
    if job.mode != "text":
        ids = [list(s) for s in segs]
        if all(x for t in ids for x in t):
            return list(enumerate(ids)), {}, {}
    elif all(t for s in segs for t in s):
        try:
            enc = encode_text_pairs(job.tokenizer, segs, job.boundary)
        except Exception:  # noqa: BLE001 - some text cannot be encoded: find it record by record
            enc = None
        if enc is not None and all(x for e, _ in enc for x in e):
            return list(enumerate(e for e, _ in enc)), {}, {k: sd for k, (_, sd) in enumerate(enc) if sd}
    spec = job.opts.spec
    names = (spec.prompt, spec.chosen, spec.rejected)
    good: _Ids = []
    bad: dict[int, tuple[str | None, str, str]] = {}
    sides: dict[int, int] = {}
    for k, s in enumerate(segs):
        try:
            if job.mode == "text":
                got, sd = _text_pair_ids(job, s, names)
                if sd:
                    sides[k] = sd
            else:
                got = [_seg_ids(x, n, job) for x, n in zip(s, names)]
            good.append((k, got))
        except SourceError as e:
            bad[k] = (e.field, e.reason, e.detail)
    return good, bad, sides


def _add_specials(job: _Job, good: _Ids) -> tuple[_Ids, int, int]:
    """BOS before prompts and EOS after completions (never doubled), then identical pairs counted
    (and dropped with ``drop_identical``): (kept, identical, dropped)."""
    bos, eos = job.bos, job.eos
    identical = dropped = 0
    kept: _Ids = []
    for k, (p, c, r) in good:
        if bos is not None and p[0] != bos:
            p = [bos] + p
        if eos is not None:
            if c[-1] != eos:
                c = c + [eos]
            if r[-1] != eos:
                r = r + [eos]
        if c == r:
            identical += 1
            if job.drop_identical:
                dropped += 1
                continue
        kept.append((k, [p, c, r]))
    return kept, identical, dropped


def _pack(job: _Job, kept: _Ids, bad: dict[int, tuple[str | None, str, str]]
          ) -> tuple[np.ndarray, list[tuple[int, ...]], _Ids]:
    """The kept pairs' ids back to back (int64) with their lengths; records holding an id outside
    ``[0, job.limit)`` move to ``bad`` (located only when the block's range check fails)."""
    flat_ids: list[int] = []
    lens: list[tuple[int, ...]] = []
    try:
        for _, (p, c, r) in kept:
            flat_ids += p
            flat_ids += c
            flat_ids += r
            lens.append((len(p), len(c), len(r)))
        tokens = np.fromiter(flat_ids, dtype=np.int64, count=len(flat_ids))
        ok = not tokens.size or (int(tokens.min()) >= 0 and int(tokens.max()) < job.limit)
    except (OverflowError, TypeError, ValueError):
        ok = False
    if ok:
        return tokens, lens, kept
    spec = job.opts.spec
    names = (spec.prompt, spec.chosen, spec.rejected)
    flat_ids, lens, kept2 = [], [], []
    for k, segs3 in kept:
        try:
            for x, n in zip(segs3, names):
                check_ids(x, n, job.limit)
        except SourceError as e:
            bad[k] = (e.field, e.reason, e.detail)
            continue
        kept2.append((k, segs3))
        for x in segs3:
            flat_ids += x
        lens.append(tuple(len(x) for x in segs3))
    return np.fromiter(flat_ids, dtype=np.int64, count=len(flat_ids)), lens, kept2


_WORKER: tuple[_Job, Callable[[Any], tuple]] | None = None



def _init_worker(job: _Job) -> None:
    global _WORKER
    # one tokenizer thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (job, make_extractor(job.opts, job.tokenizer))


def _work(block: Block) -> BlockResult:
    assert _WORKER is not None  # internal invariant: set by the pool initializer
    return process_block(_WORKER[0], _WORKER[1], block)


def _threads_suffice(job: _Job) -> bool:
    """Whether blocks take the C reader (:func:`_scan_native`), which runs without the GIL: then
    worker threads beat worker processes. A block the C reader gives up on still comes out
    right, on the Python path, just without parallelism."""
    return _accel.native is not None and _plain_ids(job)
