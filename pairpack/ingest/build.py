"""``pairpack build``: inputs -> records -> token ids -> an atomic dataset.

Pipeline: sources (:mod:`pairpack.ingest.sources`) cut the input into blocks of consecutive records
(raw JSONL bytes, or parsed records); each block is parsed, shaped (:mod:`pairpack.ingest.shapes`),
tokenized and checked as a whole by :func:`process_block`, in worker processes when
``workers > 1`` (worker threads for pre-tokenized JSONL read by the C reader, which runs without
the GIL); the main process takes the results *in input order* and hands each block's ids to
:meth:`pairpack.write.writer.Writer.add_batch`. Every decision that shapes the output (shape, text or ids
mode, special ids) is made once, before any block is processed, from the first records of the
whole input, so the dataset is byte-identical whatever the number of workers, and the parts of a
``num_shards`` split agree with each other. Memory stays flat: a bounded number of blocks is in
flight, and the writer spills to disk.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import numpy as np

from .. import _accel
from .. import format as fmt
from .._version import __version__
from ..errors import DatasetExistsError, PairpackError, SourceError
from ..format.fsio import check_output
from ..format.sidecar import read_sidecar
from ..progress import Progress
from ..tokenization import (
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    tokenizer_from_manifest,
)
from ..write.writer import Writer, check_ids
from .multi import SCORE_COLUMNS, MultiOptions, MultiSpec, PairRule, extract_multi, is_multi
from .shapes import HH_MARKER, FieldSpec, PromptTemplate, ShapeOptions, detect_shape, make_extractor
from .sources import (
    Block,
    JsonlSource,
    Source,
    block_records,
    open_sources,
    record_text,
)

__all__ = ["build", "BuildReport", "BuildPlan", "plan_build", "add_result", "attach_tokenizer", "finish_report",
           "Rejects", "rejects_path", "process_block", "BlockResult"]

DETECT_RECORDS = 1000  # records looked at (from the start of the whole input) to fix shape and mode
PARALLEL_MIN_BYTES = 4 << 20  # with workers=None, smaller inputs are built in-process (no start-up cost)
_U32 = 1 << 32


@dataclass
class BuildReport:
    """What a build did. Token counts are in tokens, sizes in bytes, time in seconds."""

    output: str
    pairs: int = 0
    rejected: Counter = field(default_factory=Counter)
    identical: int = 0
    identical_dropped: int = 0
    unique_prompts: int = 0
    tokens: int = 0
    prompt_tokens_saved: int = 0
    dataset_bytes: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    rejects_file: str | None = None
    token_dtype: str = ""
    shards: int = 0
    shape: str = ""
    mode: str = ""
    workers: int = 1
    part: str | None = None
    skipped: bool = False
    tasks: int = 0  # Ray write tasks (pairpack.ray); 0 for a build
    pair_rule: str | None = None  # multi-completion input: the rule that made the pairs
    ties: int = 0  # candidate pairs skipped for equal scores
    below_margin: int = 0  # candidate pairs skipped for a score gap under the margin
    records_without_pairs: int = 0
    completion_tokens_shared: int = 0  # completion tokens not stored again thanks to sharing
    max_gap: float = 0.0  # the largest score gap within any record (for the no-pair error)

    def summary(self) -> str:
        """A short multi-line human summary."""
        if self.skipped:
            return f"{self.output}: already built with the same inputs and options ({self.part or 'whole input'}); skipped"
        s = max(self.seconds, 1e-9)
        lines = [
            f"wrote {self.output}: {self.pairs:,} pairs in {self.shards} shard(s), {self.token_dtype}"
            + (f", part {self.part}" if self.part else ""),
            f"  input            shape {self.shape}, {self.mode}, {self.workers} worker(s)"
            + (f", {self.tasks} Ray write task(s)" if self.tasks else ""),
            f"  unique prompts   {self.unique_prompts:,}",
            f"  tokens stored    {self.tokens:,} ({self.prompt_tokens_saved:,} prompt tokens saved by de-duplication)",
            f"  dataset size     {self.dataset_bytes / 1e6:,.2f} MB",
        ]
        if self.pair_rule:
            lines += [
                f"  pairs by rule    {self.pair_rule}: {self.ties:,} tied pair(s) skipped"
                + (f", {self.below_margin:,} under the margin" if self.below_margin else "")
                + f", {self.records_without_pairs:,} record(s) gave no pair",
                f"  shared           {self.completion_tokens_shared:,} completion tokens stored once for several pairs",
            ]
        lines += [
            f"  identical pairs  {self.identical:,}" + (f" ({self.identical_dropped:,} dropped)" if self.identical_dropped else " (kept; --drop-identical drops them)" if self.identical else ""),
            f"  rejected records {sum(self.rejected.values()):,}" + (
                " (" + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.rejected.items())) + ")" if self.rejected else ""),
            f"  time             {self.seconds:,.2f} s: {self.pairs / s:,.0f} pairs/s, {self.input_bytes / s / 1e6:,.1f} MB/s of input",
        ]
        if self.rejects_file:
            lines.append(f"  rejects written to {self.rejects_file}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        return d


def rejects_path(output: str | os.PathLike) -> Path:
    """Where ``--skip-invalid`` writes rejected records: ``<output>.rejects.jsonl`` beside it."""
    p = Path(output)
    return p.parent / (p.name + ".rejects.jsonl")


class Rejects:
    """A rejects file being written (``skip_invalid``): one JSON object a line, first to a temp
    file beside ``final`` (which :func:`pairpack.format.fsio.clean_stale_temps` removes if the
    writer dies), moved into place by :meth:`commit`."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.f: Any = None

    def add(self, entry: dict[str, Any]) -> None:
        if self.f is None:
            self.f = open(self.tmp, "w", encoding="utf-8", errors="backslashreplace")
        self.f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def commit(self) -> str | None:
        """Put the file in place; with no entry, remove a stale one. Returns its path or None."""
        if self.f is None:
            self.final.unlink(missing_ok=True)  # a stale file from an earlier build would mislead
            return None
        self.f.close()
        os.replace(self.tmp, self.final)
        return str(self.final)

    def discard(self) -> None:
        if self.f is not None:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


# --- per-block work (runs in workers) ----------------------------------------------------------
@dataclass
class _Job:
    """Everything a worker needs; fixed before the first block (so output never depends on N)."""

    opts: ShapeOptions
    tokenizer: Any  # encodes text; None for id inputs without a tokenizer
    mode: str  # "text" or "ids"
    limit: int  # ids must be below it
    bos: int | None  # prepended to prompts when not already first (None: never)
    eos: int | None  # appended to completions when not already last (None: never)
    drop_identical: bool
    multi: MultiOptions | None = None  # multi-completion records (pairs made by a rule)


@dataclass
class BlockResult:
    """A processed block: pairs as ids plus the block's invalid records, in input order.

    tokens: uint32 ``(T,)``, each pair's prompt, chosen, rejected back to back; lengths: int64
    ``(3, n)``; errors: ``(line, field, reason, message, record text)`` per invalid record.
    """

    path: str
    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[tuple[int, str | None, str, str, str]]
    identical: int = 0
    identical_dropped: int = 0
    records: int = 0
    groups: list[Group] | None = None  # multi-completion input: pairs per record, tokens not in ``tokens``
    ties: int = 0
    below_margin: int = 0
    records_without_pairs: int = 0
    max_gap: float = 0.0  # the largest score gap among the block's candidate pairs


@dataclass
class Group:
    """One multi-completion record's pairs: its prompt ids, distinct completion ids (int64), the
    ``(chosen, rejected)`` indices of each pair and the pair's scores."""

    prompt: np.ndarray
    completions: list[np.ndarray]
    pairs: list[tuple[int, int]]
    score_chosen: list[float]
    score_rejected: list[float]


def _seg_ids(seg: Any, name: str, job: _Job) -> list[int]:
    """Checked ids of one segment (slow path; the fast path checks a whole block at once)."""
    if job.mode == "text":
        if not seg:
            raise SourceError("segment is empty", field=name, reason="empty")
        try:
            ids = job.tokenizer.encode(seg)
        except PairpackError as e:
            raise SourceError(str(e), field=name, reason="bad_text") from None
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises plain exceptions
            raise SourceError(f"cannot tokenize ({str(e)[:160]})", field=name, reason="bad_text") from None
        return check_ids(ids, name, job.limit).tolist()
    return check_ids(seg, name, job.limit).tolist()


def process_block(job: _Job, extractor: Callable[[Any], tuple], block: Block) -> BlockResult:
    """Parse, shape, tokenize and check one block. Pure: the result depends on ``job`` and the
    block only (never on which process runs it)."""
    if job.multi is not None:
        return _process_multi(job, block_records(block), block.path)
    if _plain_ids(job):
        return _process_ids_fast(job, extractor, block)
    return _process_records(job, extractor, block_records(block), block.path)


def _plain_ids(job: _Job) -> bool:
    """Pre-tokenized ``fields`` records under plain (undotted) names, no BOS/EOS to add: the
    inputs :func:`_process_ids_fast` (and its C reader) take."""
    spec = job.opts.spec
    return (job.multi is None and job.mode == "ids" and job.opts.shape == "fields" and job.bos is None and job.eos is None
            and not any("." in n for n in (spec.prompt, spec.chosen, spec.rejected)))


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


def _check_mode(job: _Job, text: bool) -> None:
    if text != (job.mode == "text"):
        raise SourceError(f"record has {'text' if job.mode == 'ids' else 'token ids'} but this build reads "
                          f"{job.mode} (fixed by the first records of the input)", reason="mixed_types")


def _valid_records(records: Any, shaped: Callable[[Any], tuple], errors: list) -> tuple[list[tuple[Any, tuple]], int]:
    """``([(record, shaped(record.data)), ...], records seen)``; unparsable records and those
    ``shaped`` refuses (SourceError) go to ``errors`` as ``(line, field, reason, message, text)``."""
    out = []
    nrec = 0
    for rec in records:
        nrec += 1
        if rec.error is not None:
            errors.append((rec.line, None, rec.error.reason, rec.error.detail, record_text(rec)))
            continue
        try:
            out.append((rec, shaped(rec.data)))
        except SourceError as e:
            errors.append((rec.line, e.field, e.reason, e.detail, record_text(rec)))
    return out, nrec


def _process_records(job: _Job, extractor: Callable[[Any], tuple], records: Any, path: str) -> BlockResult:
    """The general path of :func:`process_block` over an iterable of RawRecords."""
    spec = job.opts.spec
    names = (spec.prompt, spec.chosen, spec.rejected)
    errors: list[tuple[int, str | None, str, str, str]] = []

    def shaped(data: Any) -> tuple:
        s = extractor(data)
        kinds = {isinstance(x, str) for x in s}
        if len(kinds) != 1:
            raise SourceError("mixes text and token ids between prompt/chosen/rejected", reason="mixed_types")
        _check_mode(job, kinds.pop())
        return s

    valid, nrec = _valid_records(records, shaped, errors)
    recs = [r for r, _ in valid]
    segs = [s for _, s in valid]
    ids: list[list[list[int]]] | None = None
    if job.mode == "text" and segs:
        texts = [t for s in segs for t in s]
        if all(texts):
            try:
                flat = [x if type(x) is list else np.asarray(x).tolist() for x in job.tokenizer.encode_batch(texts)]
                ids = [[flat[3 * k], flat[3 * k + 1], flat[3 * k + 2]] for k in range(len(segs))]
            except Exception:  # noqa: BLE001 - some text cannot be encoded: find it record by record
                ids = None
    elif segs:
        ids = [list(s) for s in segs]
    good: list[tuple[int, list[list[int]]]] = []  # (index into recs, [p, c, r])
    if ids is not None:
        good = list(enumerate(ids))
    bad_lines: dict[int, tuple[str | None, str, str]] = {}
    if ids is None or (ids and not all(x for t in ids for x in t)):
        good = []
        for k, s in enumerate(segs):
            try:
                good.append((k, [_seg_ids(x, n, job) for x, n in zip(s, names)]))
            except SourceError as e:
                bad_lines[k] = (e.field, e.reason, e.detail)
    bos, eos = job.bos, job.eos
    lens = []
    flat_ids: list[int] = []
    identical = dropped = 0
    kept: list[tuple[int, list[list[int]]]] = []
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
    if not ok:  # rare: locate the records with out-of-range ids, keep the rest
        flat_ids, lens, kept2 = [], [], []
        for k, segs3 in kept:
            try:
                for x, n in zip(segs3, names):
                    check_ids(x, n, job.limit)
            except SourceError as e:
                bad_lines[k] = (e.field, e.reason, e.detail)
                continue
            kept2.append((k, segs3))
            for x in segs3:
                flat_ids += x
            lens.append(tuple(len(x) for x in segs3))
        kept = kept2
        tokens = np.fromiter(flat_ids, dtype=np.int64, count=len(flat_ids))
    for k, (f, reason, msg) in bad_lines.items():
        errors.append((recs[k].line, f, reason, msg, record_text(recs[k])))
    errors.sort(key=lambda e: e[0])
    lengths = np.asarray(lens, dtype=np.int64).reshape(-1, 3).T.copy()
    return BlockResult(path, tokens.astype(np.uint32), lengths, errors, identical, dropped, nrec)


def _process_multi(job: _Job, records: Any, path: str) -> BlockResult:
    """The block's multi-completion records as :class:`Group` s (see :mod:`pairpack.ingest.multi`)."""
    assert job.multi is not None  # internal invariant: process_block dispatches here only then
    spec, rule = job.multi.spec, job.multi.rule
    tmpl = PromptTemplate(job.multi.prompt_template) if job.multi.prompt_template else None
    errors: list[tuple[int, str | None, str, str, str]] = []

    def shaped(data: Any) -> tuple:
        got = extract_multi(data, spec, tmpl.render(data) if tmpl else None)
        _check_mode(job, isinstance(got[0], str))
        return got

    valid, nrec = _valid_records(records, shaped, errors)
    items = [(rec, *got) for rec, got in valid]
    encoded: list[Any] | None = None
    if job.mode == "text" and items:
        try:  # one tokenizer call for the block; a failure is located record by record below
            encoded = job.tokenizer.encode_batch([t for _, p, c, _ in items for t in [p, *c]])
        except Exception:  # noqa: BLE001 - the Rust tokenizer raises plain exceptions
            encoded = None
    out = BlockResult(path, np.zeros(0, np.uint32), np.zeros((3, 0), np.int64), errors, records=nrec, groups=[])
    at = 0
    comp_field = spec.completions
    for rec, p, comps, scores in items:
        segs = [p, *comps]
        names = ["prompt"] + [f"{comp_field}.{i}" for i in range(len(comps))]
        first, at = at, at + len(segs)
        try:
            if encoded is not None:
                ids = [check_ids(x, f, job.limit) for x, f in zip(encoded[first:at], names)]
            else:
                ids = [np.asarray(_seg_ids(x, f, job), dtype=np.int64) for x, f in zip(segs, names)]
        except SourceError as e:
            errors.append((rec.line, e.field, e.reason, e.detail, record_text(rec)))
            continue
        prompt = ids[0]
        if job.bos is not None and prompt[0] != job.bos:
            prompt = np.concatenate([[job.bos], prompt])
        distinct: dict[bytes, int] = {}
        stored: list[np.ndarray] = []
        index = []  # completion -> its distinct completion
        for c in ids[1:]:
            if job.eos is not None and c[-1] != job.eos:
                c = np.concatenate([c, [job.eos]])
            key = c.tobytes()
            if key not in distinct:
                distinct[key] = len(stored)
                stored.append(c)
            index.append(distinct[key])
        pairs, ties, below = rule.pairs(scores)
        out.ties += ties
        out.below_margin += below
        if len(scores) > 1:
            out.max_gap = max(out.max_gap, max(scores) - min(scores))
        group = Group(prompt, stored, [], [], [])
        for ci, ri in pairs:
            if index[ci] == index[ri]:
                out.identical += 1
                if job.drop_identical:
                    out.identical_dropped += 1
                    continue
            group.pairs.append((index[ci], index[ri]))
            group.score_chosen.append(scores[ci])
            group.score_rejected.append(scores[ri])
        if group.pairs:
            out.groups.append(group)  # type: ignore[union-attr]
        else:
            out.records_without_pairs += 1
    errors.sort(key=lambda e: e[0])
    return out


_WORKER: tuple[_Job, Callable[[Any], tuple]] | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER
    # one tokenizer thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (job, make_extractor(job.opts, job.tokenizer))


def _work(block: Block) -> BlockResult:
    assert _WORKER is not None  # internal invariant: set by the pool initializer
    return process_block(_WORKER[0], _WORKER[1], block)


# --- planning ---------------------------------------------------------------------------------
def _part_ranges(sources: list[Source], num_shards: int, shard_index: int) -> tuple[list[tuple[Source, int, int | None]], dict[str, int]]:
    """Which units of which source belong to part ``shard_index`` of ``num_shards``.

    Units (lines, elements, rows) are numbered over the concatenated inputs; part I takes the
    contiguous run ``[floor(I*U/K), floor((I+1)*U/K))``, so the parts are disjoint, cover the input,
    and concatenated in order give the input order (``pairpack merge`` relies on it).
    """
    if num_shards == 1:
        return [(s, 0, None) for s in sources], {}
    counts = [s.units() for s in sources]
    total = sum(counts)
    lo, hi = total * shard_index // num_shards, total * (shard_index + 1) // num_shards
    plan = []
    base = 0
    for s, n in zip(sources, counts):
        a, b = max(lo - base, 0), min(hi - base, n)
        if a < b:
            plan.append((s, a, b))
        base += n
    return plan, {"units": total, "first_unit": lo, "end_unit": hi}


def _detect(sources: list[Source], opts: ShapeOptions, tokenizer: Any) -> tuple[ShapeOptions, str | None]:
    """Shape and mode ("text"/"ids") from the first records of the whole input."""
    seen = 0
    resolved: ShapeOptions | None = opts if opts.shape is not None else None
    for s in sources:
        for rec in s.first_records(DETECT_RECORDS - seen):
            seen += 1
            r = detect_shape(rec, opts)
            if r is None:
                continue
            if resolved is None:
                resolved = r
            try:
                segs = make_extractor(resolved, tokenizer)(rec)
            except SourceError:
                continue
            if all(isinstance(x, str) for x in segs):
                return resolved, "text"
            if not any(isinstance(x, str) for x in segs):
                return resolved, "ids"
        if seen >= DETECT_RECORDS:
            break
    return resolved or ShapeOptions(shape="fields", spec=opts.spec), None


@dataclass
class BuildPlan:
    """Every decision that shapes the output, fixed before the first block is processed (so the
    output never depends on how the input is cut into blocks, workers, parts or Ray tasks).

    job: what :func:`process_block` needs. mode: ``"text"`` or ``"ids"``. tokenizer: the loaded
    tokenizer (a :class:`ByteTokenizer` for text without one; None for ids without one).
    options: recorded as the manifest's provenance ``options``. writer: keyword arguments of
    :class:`~pairpack.write.writer.Writer` (vocab_size, special ids, tokenizer identity, shard_bytes,
    dedup_window).
    """

    job: _Job
    mode: str
    tokenizer: Any
    options: dict[str, Any]
    writer: dict[str, Any]


def plan_build(opts: ShapeOptions, mode: str | None, tok: Any, *, add_bos: bool | None = None,
               add_eos: bool | None = None, skip_invalid: bool = False, drop_identical: bool = False,
               vocab_size: int | None = None, pad_id: int | None = None, shard_bytes: int | None = None,
               dedup_window: int | None = None, multi: MultiOptions | None = None) -> BuildPlan:
    """The plan of a build whose shape (``opts``) and mode were detected (:func:`_detect`); ``mode``
    None (nothing detected) means text with a tokenizer, ids without. ``multi``: the input is
    multi-completion records (pairs by a rule, score columns)."""
    shard_bytes = 1 << 30 if shard_bytes is None else shard_bytes
    dedup_window = 1 << 16 if dedup_window is None else dedup_window
    mode = mode or ("text" if tok is not None else "ids")
    if mode == "text" and tok is None:
        tok = ByteTokenizer()
    if tok is not None:
        limit = vocab_size if vocab_size is not None else tok.vocab_size
        pad = pad_id if pad_id is not None else tok.pad_id
        bos_id, eos_id, ident = tok.bos_id, tok.eos_id, tok.identity()
    else:
        limit, pad, bos_id, eos_id, ident = (vocab_size if vocab_size is not None else _U32), \
            (pad_id if pad_id is not None else 0), None, None, None
    want_eos = add_eos if add_eos is not None else mode == "text"
    job = _Job(opts=opts, tokenizer=tok if mode == "text" else None, mode=mode, limit=limit,
               bos=bos_id if add_bos else None, eos=eos_id if want_eos else None, drop_identical=drop_identical,
               multi=multi)
    options = {"add_bos": add_bos, "add_eos": add_eos, "skip_invalid": skip_invalid, "drop_identical": drop_identical,
               "vocab_size": vocab_size, "pad_id": pad_id, "shard_bytes": shard_bytes, "dedup_window": dedup_window,
               **(multi.to_json() if multi is not None else opts.to_json())}
    writer = {"vocab_size": vocab_size if tok is None else limit, "pad_id": pad, "bos_id": bos_id, "eos_id": eos_id,
              "tokenizer": ident, "shard_bytes": shard_bytes, "dedup_window": dedup_window}
    if multi is not None:
        writer["columns"] = SCORE_COLUMNS
        writer["column_info"] = {k: {"description": f"the {k[6:]} completion's score in the input record",
                                     "attrs": {"pairs": str(multi.rule)}} for k in SCORE_COLUMNS}
    return BuildPlan(job, mode, tok, options, writer)


def attach_tokenizer(directory: Path, tok: Any, ident: dict[str, Any] | None) -> dict[str, Any] | None:
    """Copy a Hugging Face tokenizer file into the dataset being written at ``directory`` (so it
    decodes anywhere) and return the identity that records it (FORMAT.md §5.2); other
    tokenizers: ``ident`` unchanged."""
    if not isinstance(tok, HFTokenizer) or ident is None:
        return ident
    shutil.copyfile(tok.path, directory / TOKENIZER_FILE)
    return {**ident, "file": {"path": TOKENIZER_FILE, "bytes": tok.nbytes, fmt.CHECKSUM_KEY: tok.hash}}


def add_result(writer: Writer, res: BlockResult, report: BuildReport, rejects: Rejects | None) -> None:
    """A processed block into ``writer``, in order. Its invalid records go to ``rejects`` (counted
    in ``report``); without one, the first raises SourceError (file, line, field)."""
    for line, fld, reason, msg, text in res.errors:
        if rejects is None:
            raise SourceError(msg, path=res.path, line=line, field=fld, reason=reason)
        report.rejected[reason] += 1
        rejects.add({"file": res.path, "line": line, "field": fld, "reason": reason, "message": msg, "record": text})
    report.identical += res.identical
    report.identical_dropped += res.identical_dropped
    if res.groups is not None:
        _write_groups(writer, res, report)
    if res.lengths.shape[1]:
        writer.add_batch(res.tokens, res.lengths)
        report.tokens += len(res.tokens)


# --- the build ----------------------------------------------------------------------------------
def build(
    inputs: Any,
    output: str | os.PathLike,
    *,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    shape: str | None = None,
    prompt_template: str | None = None,
    chat_template: str = "chatml",
    hh_marker: str = HH_MARKER,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
    force: bool = False,
    skip_invalid: bool = False,
    drop_identical: bool = False,
    shard_bytes: int | None = None,
    dedup_window: int | None = None,
    workers: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    resume: bool = False,
    progress: bool | None = None,
    on_record: Callable[[int], None] | None = None,
    max_record_bytes: int | None = None,
    pairs: str | None = None,
    score_key: str | None = None,
) -> BuildReport:
    """Build a dataset at ``output`` from preference records.

    Args:
        inputs: files (``.jsonl``/``.jsonl.gz``/``.jsonl.zst``, ``.json`` arrays, ``.parquet``),
            directories of them, a Hugging Face ``datasets.Dataset``, or a list of dicts.
        output: the dataset directory to create (atomically).
        prompt, chosen, rejected: field names, dotted paths allowed (every shape).
        shape: ``fields``, ``hh``, ``chat`` or ``template``; None detects it from the first records
            (see :func:`pairpack.ingest.shapes.detect_shape`).
        prompt_template: composite prompt over fields, e.g. ``"{instruction}[[\\n\\n{input}]]"`` or
            ``"alpaca"`` (see :class:`pairpack.ingest.shapes.PromptTemplate`).
        chat_template: ``chatml``, ``hh``, or a Jinja template file, for chat records.
        hh_marker: the assistant marker of HH transcripts.
        tokenizer: a tokenizer object, a path to a Hugging Face ``tokenizer.json``, or None (the
            built-in byte-level tokenizer for text; ids stored verbatim otherwise). A Hugging Face
            tokenizer file is copied into the dataset as ``tokenizer.json``.
        vocab_size: for id inputs without a tokenizer, the vocabulary size (else max id + 1).
        pad_id: overrides the tokenizer's pad id (id inputs default to 0).
        add_bos: prepend BOS to prompts (never doubled). add_eos: append EOS to completions
            (never doubled); default on for text when the tokenizer has an EOS, off for ids.
        force: replace an existing dataset. skip_invalid: write bad records to
            ``<output>.rejects.jsonl`` and go on instead of stopping at the first.
        drop_identical: drop pairs whose chosen and rejected ids are equal (always counted).
        shard_bytes: start a new shard past this many token bytes (default 1 GiB).
        dedup_window: distinct recent prompts remembered for de-duplication (default 65,536).
        workers: tokenizing processes (None: all cores, or in-process for inputs under 4 MiB).
            The output is byte-identical for every value.
        num_shards, shard_index: build only part ``shard_index`` of ``num_shards`` contiguous,
            disjoint parts of the input (for ``pairpack merge``).
        resume: when ``output`` already holds a dataset built from the same inputs and options,
            keep it and return at once (re-running an interrupted K-part build redoes only the
            missing parts).
        progress: show a progress line (None: when stderr is a terminal).
        max_record_bytes: JSONL lines longer than this are rejected as ``too_long`` without
            being read into memory (default :data:`pairpack.ingest.sources.MAX_RECORD_BYTES`, 64 MiB).
        pairs: for multi-completion records (one prompt, N rated completions; see
            :mod:`pairpack.ingest.multi`), the rule that makes pairs: ``"best-worst"``, ``"best-rest"`` or
            ``"margin:X"``. Such records are detected from the first records when no ``shape`` is
            forced, with ``"best-worst"`` as the default rule. Each distinct completion of a record
            is stored once (FORMAT.md §7.6) and the pairs get float32 columns ``score_chosen`` and
            ``score_rejected``. A build whose rule makes no pair at all raises SourceError.
        score_key: the score's key inside UltraFeedback-style completion objects (default: the
            first of ``overall_score``, ``score``, ``rating`` present).

    Returns:
        A :class:`BuildReport`. Raises SourceError (file, line, field) on the first bad record
        unless ``skip_invalid``; nothing is left at ``output`` then.
    """
    t0 = time.perf_counter()
    out = Path(output)
    if not 1 <= num_shards or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards): got {shard_index} of {num_shards}")
    opts = ShapeOptions(shape=shape, spec=FieldSpec(prompt, chosen, rejected), prompt_template=prompt_template,
                        chat_template=chat_template, hh_marker=hh_marker)
    sources = open_sources(inputs)
    if max_record_bytes is not None:
        for src in sources:
            if isinstance(src, JsonlSource):
                src.max_record_bytes = max_record_bytes
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    side = read_sidecar(sources[0].path) if len(sources) == 1 and sources[0].size else None
    if side is not None:  # an export of a dataset: rebuild it with the same settings (merge.py)
        if tok is None:
            tok = _sidecar_tokenizer(side, Path(sources[0].path).parent)
        if vocab_size is None and tok is None:
            vocab_size = side.get("vocab_size")
        pad_id = side.get("pad_id") if pad_id is None else pad_id
        shard_bytes = side.get("shard_bytes") if shard_bytes is None else shard_bytes
        dedup_window = side.get("dedup_window") if dedup_window is None else dedup_window
    part = None if num_shards == 1 else {"num_shards": num_shards, "shard_index": shard_index}
    if not resume:  # before reading any input (--resume compares an existing dataset first)
        check_output(out, force=force)

    rule = PairRule.parse(pairs) if pairs is not None else None
    if rule is not None and shape is not None:
        raise ValueError(f"pairs={pairs!r} reads multi-completion records; it cannot be combined with shape={shape!r}")
    mspec = MultiSpec(prompt=None if prompt == "prompt" else prompt, score_key=score_key)
    multi_mode = _detect_multi(sources, mspec, prompt_template) if shape is None else None
    multi = None
    if rule is not None or multi_mode is not None:
        multi = MultiOptions(mspec, rule or PairRule("best-worst"), prompt_template)
        opts, mode = ShapeOptions(shape=None, spec=opts.spec, prompt_template=prompt_template), multi_mode
        if prompt_template:
            PromptTemplate(prompt_template)
    else:
        opts, mode = _detect(sources, opts, tok)
    bp = plan_build(opts, mode, tok, add_bos=add_bos, add_eos=add_eos, skip_invalid=skip_invalid,
                    drop_identical=drop_identical, vocab_size=vocab_size, pad_id=pad_id, shard_bytes=shard_bytes,
                    dedup_window=dedup_window, multi=multi)
    opts, mode, tok, job, options = bp.job.opts, bp.mode, bp.tokenizer, bp.job, bp.options
    if out.exists() or out.is_symlink():
        ident_now = tok.identity() if tok is not None else None
        if resume and _up_to_date(out, sources, options, part, ident_now):
            return BuildReport(output=str(out), skipped=True, shape=opts.shape or "", mode=mode,
                               part=f"{shard_index}/{num_shards}" if part else None)
        if not force:
            raise DatasetExistsError(f"{out}: already exists and was built differently; pass --force to replace it")

    plan, unit_info = _part_ranges(sources, num_shards, shard_index)
    report = BuildReport(output=str(out), shape="multi" if multi else opts.shape or "", mode=mode,
                         part=f"{shard_index}/{num_shards}" if part else None,
                         pair_rule=str(multi.rule) if multi else None)
    total_bytes = sum(s.size for s in sources)
    report.input_bytes = total_bytes
    n_workers = _choose_workers(workers, sources, total_bytes)
    report.workers = n_workers
    bar = Progress(total_bytes or None, enabled=progress)
    rejects = Rejects(rejects_path(out))
    writer = Writer(out, force=force, **bp.writer)
    pool: ProcessPoolExecutor | ThreadPoolExecutor | None = None
    feed: Generator[tuple[int, Block], None, None] | None = None
    results: Generator[tuple[tuple[int, BlockResult], int], None, None] | None = None
    try:
        writer.tokenizer = attach_tokenizer(writer.tmp, tok, writer.tokenizer)
        offsets = {}
        base = 0
        for s in sources:
            offsets[id(s)] = base
            base += s.size

        def blocks() -> Iterator[tuple[int, Block]]:
            for s, lo, hi in plan:
                with closing(s.blocks(lo, hi)) as source_blocks:
                    for b in source_blocks:
                        yield offsets[id(s)], b

        feed = blocks()

        if n_workers > 1 and _threads_suffice(job):
            # the C reader releases the GIL for the whole block: threads parallelise it with no
            # pickling of blocks and results between processes (which cost more than the parse)
            extractor = make_extractor(opts, tok)
            pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pairpack-build")
            results = _ordered(lambda b, p=pool: p.submit(process_block, job, extractor, b), feed, 2 * n_workers)
        elif n_workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
            if ctx.get_start_method() == "fork":
                # the parent's tokenizer threads must not be inherited mid-use; see tokenization.py
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
            pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(job,))
            results = _ordered(lambda b, p=pool: p.submit(_work, b), feed, 2 * n_workers)
        else:
            extractor = make_extractor(opts, tok)
            results = (((base_b, process_block(job, extractor, b)), b.done_bytes) for base_b, b in feed)
        for (base_b, res), done in results:
            add_result(writer, res, report, rejects if skip_invalid else None)
            if on_record is not None:
                on_record(writer.num_pairs)
            bar.update(writer.num_pairs, base_b + done)
        if pool is not None:
            pool.shutdown()
            pool = None
        if multi is not None and writer.num_pairs == 0:
            raise _no_pairs_error(multi, report, sources)
        writer.provenance = {
            "pairpack_version": __version__,
            "inputs": [s.provenance() for s in sources],
            "options": options,
            "mode": mode,
            **({"part": {**part, **unit_info}} if part else {}),
        }
        manifest = writer.commit()
        report.rejects_file = rejects.commit()
    except BaseException:
        bar.close()
        # the exception's traceback keeps this frame, and with it the generators, alive: close
        # them now, which stops and joins the input's read-ahead thread (sources._ReadAhead)
        if results is not None:
            results.close()
        if feed is not None:
            feed.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        rejects.discard()
        raise
    bar.close()
    finish_report(report, manifest)
    report.seconds = time.perf_counter() - t0
    return report


def finish_report(report: BuildReport, manifest: fmt.Manifest) -> None:
    """The report's figures read from the written manifest; ``report.tokens`` goes in as the
    tokens given to the writer and comes out as the tokens stored (prompt sharing the difference)."""
    report.pairs = manifest.num_pairs
    report.unique_prompts = sum(s.num_prompts for s in manifest.shards)
    stored = sum(s.num_tokens for s in manifest.shards)
    report.prompt_tokens_saved = report.tokens - stored - report.completion_tokens_shared
    report.tokens = stored
    report.token_dtype = manifest.token_dtype
    report.shards = len(manifest.shards)
    report.dataset_bytes = sum(e.bytes for e in manifest.files()) + len(manifest.dumps())


def _detect_multi(sources: list[Source], spec: MultiSpec, prompt_template: str | None) -> str | None:
    """``"text"``/``"ids"`` when the first multi-completion record among the first records is text
    or ids, else None (the input is not multi-completion)."""
    seen = 0
    tmpl = PromptTemplate(prompt_template) if prompt_template else None
    for s in sources:
        for rec in s.first_records(DETECT_RECORDS - seen):
            seen += 1
            if not is_multi(rec, spec):
                continue
            try:
                p, _, _ = extract_multi(rec, spec, tmpl.render(rec) if tmpl else None)
            except SourceError:
                continue
            return "text" if isinstance(p, str) else "ids"
        if seen >= DETECT_RECORDS:
            break
    return None


def _write_groups(writer: Writer, res: BlockResult, report: BuildReport) -> None:
    """Hand a block's multi-completion groups to the writer; count what sharing saved."""
    for g in res.groups or ():
        writer.add_group(g.prompt, g.completions, g.pairs,
                         {"score_chosen": g.score_chosen, "score_rejected": g.score_rejected})
        per_pair = sum(len(g.completions[c]) + len(g.completions[r]) for c, r in g.pairs)
        once = sum(len(g.completions[k]) for k in {k for pr in g.pairs for k in pr})
        report.tokens += len(g.prompt) * len(g.pairs) + per_pair
        report.completion_tokens_shared += per_pair - once
    report.ties += res.ties
    report.below_margin += res.below_margin
    report.records_without_pairs += res.records_without_pairs
    report.max_gap = max(report.max_gap, res.max_gap)


def _no_pairs_error(multi: MultiOptions, report: BuildReport, sources: list[Source]) -> SourceError:
    rule = multi.rule
    why = (f"the largest score gap in any record is {report.max_gap:g}; lower the margin (--pairs margin:X)"
           if rule.kind == "margin" else "every record's completions are tied or fewer than two")
    return SourceError(f"pair rule {rule} made no pair ({report.ties:,} tied, {report.below_margin:,} under the "
                       f"margin, {report.records_without_pairs:,} record(s) without a pair): {why}",
                       path=sources[0].path if len(sources) == 1 else None,
                       field=multi.spec.score_key or f"{multi.spec.completions}.*.score / {multi.spec.scores}",
                       reason="no_pairs")


def _sidecar_tokenizer(side: dict[str, Any], where: Path) -> Any:
    t = side.get("tokenizer")
    if not isinstance(t, dict):
        return None
    if t.get("kind") == "bytes":
        return ByteTokenizer()
    if t.get("kind") == "huggingface":
        obj = dict(t)
        if isinstance(side.get("tokenizer_file"), str):
            obj["file"] = {"path": side["tokenizer_file"]}
        got = tokenizer_from_manifest(obj, where)
        if got is None:
            raise SourceError("the export's tokenizer file is missing or differs; pass --tokenizer",
                              path=where, reason="missing_tokenizer")
        return got
    return None


def _choose_workers(workers: int | None, sources: list[Source], total_bytes: int) -> int:
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    small = total_bytes < PARALLEL_MIN_BYTES and all(s.size for s in sources)
    return 1 if small else cores


def _ordered(submit: Callable[[Block], Future], blocks: Iterator[tuple[int, Block]], window: int
             ) -> Generator[tuple[tuple[int, BlockResult], int], None, None]:
    """Results of ``blocks`` in submission order, at most ``window`` in flight (bounded memory)."""
    q: deque[tuple[int, Block, Future]] = deque()
    it = iter(blocks)
    try:
        for base_b, b in it:
            q.append((base_b, b, submit(b)))
            if len(q) >= window:
                break
        while q:
            base_b, b, fut = q.popleft()
            res = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                q.append((nxt[0], nxt[1], submit(nxt[1])))
            yield (base_b, res), b.done_bytes
    finally:
        for _, _, fut in q:
            fut.cancel()


def _threads_suffice(job: _Job) -> bool:
    """Whether blocks take the C reader (:func:`_scan_native`), which runs without the GIL: then
    worker threads beat worker processes. A block the C reader gives up on still comes out
    right, on the Python path, just without parallelism."""
    return _accel.native is not None and _plain_ids(job)


def _up_to_date(out: Path, sources: list[Source], options: dict[str, Any], part: dict[str, int] | None,
                tok_ident: dict[str, Any] | None) -> bool:
    """Whether ``out`` is a dataset built from these inputs (names and sizes), tokenizer and options."""
    try:
        m = fmt.read_manifest(out)
    except PairpackError:
        return False

    def key(t: dict[str, Any] | None) -> Any:
        return None if t is None else {k: v for k, v in t.items() if k not in ("file", "source_path")}

    if key(m.tokenizer) != key(tok_ident):
        return False
    prov = m.provenance
    got = prov.get("options", {})
    if any(got.get(k) != v for k, v in options.items()):
        return False
    names = [(i.get("path"), i.get("bytes")) for i in prov.get("inputs", [])]
    mine = [(Path(s.path).name, s.size) if s.size else (s.path, None) for s in sources]
    if len(names) != len(mine) or any(a[0] != b[0] or (b[1] is not None and a[1] != b[1])
                                      for a, b in zip(names, mine)):
        return False
    got_part = prov.get("part")
    if part is None:
        return got_part is None
    return got_part is not None and all(got_part.get(k) == v for k, v in part.items())

