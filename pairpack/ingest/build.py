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

import dataclasses
import json
import multiprocessing as mp
import os
import re
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
from ..errors import ArgumentError, DatasetExistsError, PairpackError, SourceError
from ..format.fsio import check_output
from ..format.sidecar import read_sidecar
from ..progress import Progress, dataset_bytes, size_text
from ..tokenization import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    describe_special,
    encode_continuations,
    load_tokenizer,
    tokenizer_from_manifest,
)
from ..write.writer import Writer, check_ids
from .multi import SCORE_COLUMNS, MultiOptions, MultiSpec, PairRule, extract_multi, is_multi
from .shapes import (
    CHAT_SPLIT_NOTE,
    HH_MARKER,
    MISSING,
    FieldSpec,
    PromptTemplate,
    ShapeOptions,
    detect_shape,
    get_path,
    make_extractor,
    missing_field,
)
from .sources import (
    Block,
    JsonlSource,
    Source,
    block_records,
    open_sources,
    record_text,
)

__all__ = ["build", "BuildOptions", "BuildReport", "BuildPlan", "ColumnSpec", "plan_build", "add_result",
           "resolve_chat_template", "check_chat_template",
           "attach_tokenizer", "finish_report", "Rejects", "rejects_path", "process_block", "BlockResult"]

DETECT_RECORDS = 1000  # records looked at (from the start of the whole input) to fix shape and mode
PARALLEL_MIN_BYTES = 4 << 20  # with workers=None, smaller inputs are built in-process (no start-up cost)
_U32 = 1 << 32


@dataclass
class BuildReport:
    """What a build did. Token counts are in tokens, sizes in bytes, time in seconds.

    ``tokenizer``, ``template``, ``bos`` and ``eos`` describe what the build used (for the
    summary); ``notes`` counts records that were built with a remark (e.g. chat templates split at
    the common prefix); ``vocab_note`` says how the vocabulary size was chosen when nothing gave it.
    """

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
    shape_reason: str = ""
    tokenizer: str = ""
    template: str = ""
    bos: str = ""
    eos: str = ""
    columns: list = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    vocab_note: str | None = None
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
            f"  input            shape {self.shape}" + (f" ({self.shape_reason})" if self.shape_reason else "")
            + f", {self.mode}, {self.workers} worker(s)" + (f", {self.tasks} Ray write task(s)" if self.tasks else ""),
        ]
        if self.tokenizer:
            lines.append(f"  tokenizer        {self.tokenizer}")
        if self.template:
            lines.append(f"  template         {self.template}")
        if self.bos or self.eos:
            lines.append(f"  BOS              {self.bos}")
            lines.append(f"  EOS              {self.eos}")
        if self.vocab_note:
            lines.append(f"  vocabulary       {self.vocab_note}")
        if self.columns:
            lines.append(f"  columns          {', '.join(self.columns)}")
        lines += [
            f"  unique prompts   {self.unique_prompts:,}",
            f"  tokens stored    {self.tokens:,} ({self.prompt_tokens_saved:,} prompt tokens saved by de-duplication)",
            f"  dataset size     {size_text(self.dataset_bytes)}",
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
        ]
        if self.notes.get(CHAT_SPLIT_NOTE):
            lines.append(f"  chat splits      {self.notes[CHAT_SPLIT_NOTE]:,} record(s) whose template renders the prompt "
                         "differently once a reply follows: split at the common prefix (--strict-chat-template refuses them)")
        lines.append(f"  time             {self.seconds:,.2f} s: {self.pairs / s:,.0f} pairs/s, "
                     f"{self.input_bytes / s / 1e6:,.1f} MB/s of input")
        if self.rejects_file:
            lines.append(f"  rejects written to {self.rejects_file}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        d["notes"] = dict(self.notes)
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
    columns: tuple[ColumnSpec, ...] = ()  # record fields kept as per-pair columns
    multi: MultiOptions | None = None  # multi-completion records (pairs made by a rule)


@dataclass(frozen=True)
class ColumnSpec:
    """A record field kept as a per-pair column: column ``name`` (FORMAT.md §4.4) from the field
    at dotted ``path``, stored as ``dtype``."""

    name: str
    path: str
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str, dtype: str | None = None) -> "ColumnSpec":
        """``"score_chosen"``, ``"chosen_score=scores.chosen"`` or ``"rating=meta.rating:int64"``:
        column name (default: the field with non-alphanumerics as ``_``), field, dtype."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = "", text
        dt = dtype or "float32"
        if ":" in path:
            path, dt = path.rsplit(":", 1)
        name = name or re.sub(r"[^a-z0-9_]", "_", path.lower())
        if dt not in fmt.COLUMN_DTYPES or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not path:
            raise ValueError(f"bad column {text!r}: write FIELD, NAME=FIELD or NAME=FIELD:DTYPE with names "
                             f"[a-z][a-z0-9_]* and dtypes {', '.join(sorted(fmt.COLUMN_DTYPES))}")
        if name in ("prompt", "chosen", "rejected"):
            raise ValueError(f"column name {name!r} is a segment name; choose another (NAME=FIELD)")
        return cls(name, path, dt)


@dataclass
class BlockResult:
    """A processed block: pairs as ids plus the block's invalid records, in input order.

    tokens: uint32 ``(T,)``, each pair's prompt, chosen, rejected back to back; lengths: int64
    ``(3, n)``; errors: ``(line, field, reason, message, record text)`` per invalid record;
    columns: name -> ``(n,)`` values of the kept columns; notes: counts of remarks (see
    :class:`pairpack.ingest.shapes.Segments`).
    """

    path: str
    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[tuple[int, str | None, str, str, str]]
    identical: int = 0
    identical_dropped: int = 0
    records: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
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


def _seg_ids(seg: Any, name: str, job: _Job, after: int | None = None) -> list[int]:
    """Checked ids of one segment (slow path; the fast path checks a whole block at once).
    ``after``: for a completion, the last id of its prompt (it is encoded as the continuation)."""
    if job.mode == "text":
        if not seg:
            raise SourceError("segment is empty", field=name, reason="empty")
        try:
            ids = (encode_continuations(job.tokenizer, [seg], [after])[0] if after is not None
                   else job.tokenizer.encode(seg))
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
_Error = tuple[int, "str | None", str, str, str]


def _process_records(job: _Job, extractor: Callable[[Any], tuple], records: Any, path: str) -> BlockResult:
    """The general path of :func:`process_block` over an iterable of RawRecords: shape each record,
    tokenize the block's texts in two batches, add BOS/EOS, drop identical pairs if asked, and check
    the id range; invalid records become errors in input order."""
    recs, segs, cols, notes, errors = _shape_records(job, extractor, records)
    nrec = len(recs) + len(errors)
    good, bad = _tokenize(job, segs)
    kept, identical, dropped = _add_specials(job, good)
    tokens, lens, kept = _pack(job, kept, bad)
    errors += [(recs[k].line, f, reason, msg, record_text(recs[k])) for k, (f, reason, msg) in bad.items()]
    errors.sort(key=lambda e: e[0])
    lengths = np.asarray(lens, dtype=np.int64).reshape(-1, 3).T.copy()
    columns = {c.name: np.asarray([cols[k][i] for k, _ in kept], dtype=c.dtype).reshape(-1)
               for i, c in enumerate(job.columns)}
    counts = Counter(notes[k] for k, _ in kept if notes[k])
    return BlockResult(path, tokens.astype(np.uint32), lengths, errors, identical, dropped, nrec, columns, counts)


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


def _column_value(data: Any, col: ColumnSpec) -> float:
    """The number at ``col.path`` of a record (a SourceError names the field when it is not one)."""
    v = get_path(data, col.path)
    if v is MISSING or v is None:
        raise missing_field(data, col.path, what=f"missing field (kept as column {col.name!r} by --columns)")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SourceError(f"column {col.name!r} needs a number, got {type(v).__name__} {str(v)[:40]!r}",
                          field=col.path, reason="bad_column")
    if col.dtype.startswith("int") and (not float(v).is_integer()):
        raise SourceError(f"column {col.name!r} is {col.dtype}, got {v!r}", field=col.path, reason="bad_column")
    if not np.isfinite(v):
        raise SourceError(f"column {col.name!r}: non-finite value {v!r}", field=col.path, reason="bad_column")
    return v


def _tokenize(job: _Job, segs: list[tuple]) -> tuple[_Ids, dict[int, tuple[str | None, str, str]]]:
    """Ids of every record's segments: text is encoded in two batches (prompts, then completions
    as continuations of their prompts), retried record by record when a batch fails so that the
    record at fault is named; id segments are taken as they are."""
    if not segs:
        return [], {}
    if job.mode != "text":
        ids = [list(s) for s in segs]
    else:
        ids = None
        if all(t for s in segs for t in s):
            try:
                ps = job.tokenizer.encode_batch([s[0] for s in segs])
                ends = [int(p[-1]) if len(p) else None for p in ps for _ in (1, 2)]
                cs = encode_continuations(job.tokenizer, [t for s in segs for t in s[1:]], ends)
                flat = [x if type(x) is list else np.asarray(x).tolist() for x in ps + cs]
                n = len(segs)
                ids = [[flat[k], flat[n + 2 * k], flat[n + 2 * k + 1]] for k in range(n)]
            except Exception:  # noqa: BLE001 - some text cannot be encoded: find it record by record
                ids = None
    if ids is not None and all(x for t in ids for x in t):
        return list(enumerate(ids)), {}
    spec = job.opts.spec
    names = (spec.prompt, spec.chosen, spec.rejected)
    good: _Ids = []
    bad: dict[int, tuple[str | None, str, str]] = {}
    for k, s in enumerate(segs):
        try:
            p = _seg_ids(s[0], names[0], job)
            good.append((k, [p] + [_seg_ids(x, n, job, p[-1]) for x, n in zip(s[1:], names[1:])]))
        except SourceError as e:
            bad[k] = (e.field, e.reason, e.detail)
    return good, bad


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


def _process_multi(job: _Job, records: Any, path: str) -> BlockResult:
    """The block's multi-completion records as :class:`Group` s (see :mod:`pairpack.ingest.multi`).
    Text is encoded as in :func:`_tokenize`: prompts in one batch, completions as continuations of
    their prompt in another, retried record by record when a batch fails."""
    assert job.multi is not None  # internal invariant: process_block dispatches here only then
    spec, rule = job.multi.spec, job.multi.rule
    tmpl = PromptTemplate(job.multi.prompt_template) if job.multi.prompt_template else None
    errors: list[_Error] = []
    items = []  # (record, prompt, completions, scores)
    nrec = 0
    for rec in records:
        nrec += 1
        if rec.error is not None:
            errors.append((rec.line, None, rec.error.reason, rec.error.detail, record_text(rec)))
            continue
        try:
            p, comps, scores = extract_multi(rec.data, spec, tmpl.render(rec.data) if tmpl else None)
            if isinstance(p, str) != (job.mode == "text"):
                raise SourceError(f"record has {'text' if job.mode == 'ids' else 'token ids'} but this build reads "
                                  f"{job.mode} (fixed by the first records of the input)", reason="mixed_types")
        except SourceError as e:
            errors.append((rec.line, e.field, e.reason, e.detail, record_text(rec)))
            continue
        items.append((rec, p, comps, scores))
    encoded: list[list[Any]] | None = None
    if job.mode == "text" and items and all(t for _, p, c, _ in items for t in [p, *c]):
        try:  # two tokenizer calls for the block; a failure is located record by record below
            ps = job.tokenizer.encode_batch([p for _, p, _, _ in items])
            texts = [t for _, _, c, _ in items for t in c]
            after = [int(pi[-1]) if len(pi) else None for pi, (_, _, c, _) in zip(ps, items) for _ in c]
            cs = iter(encode_continuations(job.tokenizer, texts, after))
            encoded = [[pi, *[next(cs) for _ in c]] for pi, (_, _, c, _) in zip(ps, items)]
        except Exception:  # noqa: BLE001 - the Rust tokenizer raises plain exceptions
            encoded = None
    out = BlockResult(path, np.zeros(0, np.uint32), np.zeros((3, 0), np.int64), errors, records=nrec, groups=[])
    comp_field = spec.completions
    for k, (rec, p, comps, scores) in enumerate(items):
        names = ["prompt"] + [f"{comp_field}.{i}" for i in range(len(comps))]
        try:
            if encoded is not None:
                ids = [check_ids(x, f, job.limit) for x, f in zip(encoded[k], names)]
            else:
                prompt_ids = _seg_ids(p, names[0], job)
                ids = [np.asarray(prompt_ids, dtype=np.int64)] + [
                    np.asarray(_seg_ids(x, f, job, prompt_ids[-1]), dtype=np.int64) for x, f in zip(comps, names[1:])]
        except SourceError as e:
            errors.append((rec.line, e.field, e.reason, e.detail, record_text(rec)))
            continue
        prompt = np.asarray(ids[0], dtype=np.int64)
        if job.bos is not None and prompt[0] != job.bos:
            prompt = np.concatenate([[job.bos], prompt])
        distinct: dict[bytes, int] = {}
        stored: list[np.ndarray] = []
        index = []  # completion -> its distinct completion
        for c in ids[1:]:
            c = np.asarray(c, dtype=np.int64)
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
    """Shape and mode ("text"/"ids") from the first records of the whole input. A detection error
    (a field named with --prompt that the records lack) names the input file."""
    seen = 0
    resolved: ShapeOptions | None = opts if opts.shape is not None else None
    for s in sources:
        for rec in s.first_records(DETECT_RECORDS - seen):
            seen += 1
            try:
                r = detect_shape(rec, opts)
            except SourceError as e:
                raise SourceError(e.detail, path=s.path, field=e.field, reason=e.reason) from None
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
    return resolved or ShapeOptions(shape="fields", spec=opts.spec, explicit=opts.explicit,
                                    why="no record has both chosen and rejected fields"), None


@dataclass
class BuildPlan:
    """Every decision that shapes the output, fixed before the first block is processed (so the
    output never depends on how the input is cut into blocks, workers, parts or Ray tasks).

    job: what :func:`process_block` needs. mode: ``"text"`` or ``"ids"``. tokenizer: the loaded
    tokenizer (a :class:`ByteTokenizer` for text without one; None for ids without one).
    options: recorded as the manifest's provenance ``options``. writer: keyword arguments of
    :class:`~pairpack.write.writer.Writer` (vocab_size, special ids, tokenizer identity, shard_bytes,
    dedup_window, columns).
    """

    job: _Job
    mode: str
    tokenizer: Any
    options: dict[str, Any]
    writer: dict[str, Any]


def plan_build(opts: ShapeOptions, mode: str | None, tok: Any, *, add_bos: bool | None = None,
               add_eos: bool | None = None, skip_invalid: bool = False, drop_identical: bool = False,
               vocab_size: int | None = None, pad_id: int | None = None, shard_bytes: int | None = None,
               dedup_window: int | None = None, columns: tuple[ColumnSpec, ...] = (),
               multi: MultiOptions | None = None) -> BuildPlan:
    """The plan of a build whose shape (``opts``) and mode were detected (:func:`_detect`); ``mode``
    None (nothing detected) means text with a tokenizer, ids without. ``add_bos`` None: the
    tokenizer config's ``add_bos_token`` for text, else off. ``multi``: the input is
    multi-completion records (pairs by a rule, score columns; no other columns)."""
    if multi is not None and columns:
        raise ArgumentError("columns cannot be kept from multi-completion records (their pairs get "
                            f"{', '.join(SCORE_COLUMNS)}); drop --columns or --pairs")
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
    config_bos = getattr(tok, "add_bos", None) if mode == "text" else None
    want_bos = add_bos if add_bos is not None else bool(config_bos)
    want_eos = add_eos if add_eos is not None else mode == "text"
    job = _Job(opts=opts, tokenizer=tok if mode == "text" else None, mode=mode, limit=limit,
               bos=bos_id if want_bos else None, eos=eos_id if want_eos else None, drop_identical=drop_identical,
               columns=columns, multi=multi)
    options = {"add_bos": add_bos, "add_eos": add_eos, "skip_invalid": skip_invalid, "drop_identical": drop_identical,
               "vocab_size": vocab_size, "pad_id": pad_id, "shard_bytes": shard_bytes, "dedup_window": dedup_window}
    if columns:
        options["columns"] = [dataclasses.asdict(c) for c in columns]
    options.update(multi.to_json() if multi is not None else opts.to_json())
    writer = {"vocab_size": vocab_size if tok is None else limit, "pad_id": pad, "bos_id": bos_id, "eos_id": eos_id,
              "tokenizer": ident, "shard_bytes": shard_bytes, "dedup_window": dedup_window,
              "columns": {c.name: c.dtype for c in columns},
              "column_info": {c.name: {"description": f"record field {c.path!r} (pairpack build --columns)",
                                       "attrs": {"field": c.path}} for c in columns}}
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
    report.notes.update(res.notes)
    if res.groups is not None:
        _write_groups(writer, res, report)
    if res.lengths.shape[1]:
        writer.add_batch(res.tokens, res.lengths, res.columns)
        report.tokens += len(res.tokens)


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
    report.dataset_bytes = dataset_bytes(manifest)


def resolve_chat_template(opts: ShapeOptions, tok: Any, given: str | None) -> ShapeOptions:
    """``opts`` with the chat template to use: ``given`` (``"tokenizer"``: the tokenizer's own),
    else the tokenizer's own template (a model directory's ``tokenizer_config.json``), else
    chatml (which :func:`check_chat_template` refuses for chat records when the tokenizer does
    not know chatml's markers)."""
    own = getattr(tok, "chat_template", None)
    if given == "tokenizer" or (given is None and own):
        if not own:
            raise ValueError(f"--chat-template tokenizer: {getattr(tok, 'name', 'the tokenizer')} has no chat "
                             f"template (no {TOKENIZER_CONFIG_FILE} with a chat_template beside its tokenizer.json)")
        return dataclasses.replace(opts, chat_template=own, chat_template_name=f"{TOKENIZER_CONFIG_FILE} of {tok.name}")
    return opts


def check_chat_template(opts: ShapeOptions, tok: Any, given: str | None) -> None:
    """Refuse chat records read with chatml by default when chatml's markers are not tokens of
    the tokenizer (they would become 9-10 plain-text tokens each): the user must choose."""
    if (opts.shape == "chat" and given is None and opts.chat_template_name is None
            and isinstance(tok, HFTokenizer) and not tok.has_token("<|im_start|>")):
        raise ValueError(f"chat records need a chat template: the tokenizer {tok.name} has none (no "
                         f"{TOKENIZER_CONFIG_FILE} with a chat_template beside it) and chatml's markers are not "
                         "tokens of it (they would become plain-text tokens); pass --tokenizer MODEL_DIR, or "
                         "--chat-template chatml|hh|FILE to choose one")


# --- the build ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    """The settings of a build: the keyword arguments of :func:`build`.

    Attributes:
        prompt, chosen, rejected: field names, dotted paths allowed (every shape). None: the
            default names ("prompt", ...), which detection may replace for recognised layouts
            (ShareGPT ``conversations``, OpenAI ``input.messages``); a name given here never is.
        shape: ``fields``, ``hh``, ``chat`` or ``template``; None detects it from the first records
            (see :func:`pairpack.ingest.shapes.detect_shape`).
        prompt_template: composite prompt over fields, e.g. ``"{instruction}[[\\n\\n{input}]]"`` or
            ``"alpaca"`` (see :class:`pairpack.ingest.shapes.PromptTemplate`).
        chat_template: ``chatml``, ``hh``, a Jinja template file or a ``tokenizer_config.json``, or
            ``"tokenizer"``; None: the tokenizer's own template when it has one (a model
            directory's ``tokenizer_config.json``), else chatml where chatml's markers are tokens
            of the tokenizer (or for the byte tokenizer); other tokenizers must be given one.
        strict_chat_template: refuse records whose template renders the prompt differently once
            a reply follows, instead of splitting them at the common prefix.
        template_args: variables for Jinja chat templates (e.g. ``{"enable_thinking": False}``);
            a record's own ``chat_template_kwargs`` take precedence.
        hh_marker: the assistant marker of HH transcripts.
        tokenizer: a tokenizer object, a path to a Hugging Face ``tokenizer.json`` or to a model
            directory holding one (with its ``tokenizer_config.json``), or None (the built-in
            byte-level tokenizer for text; ids stored verbatim otherwise). The ``tokenizer.json``
            is copied into the dataset as ``tokenizer.json``.
        vocab_size: for id inputs without a tokenizer, the vocabulary size (else max id + 1,
            which the report says).
        pad_id: overrides the tokenizer's pad id (id inputs default to 0).
        add_bos: prepend BOS to prompts (never doubled); default: the tokenizer config's
            ``add_bos_token``, else off. add_eos: append EOS to completions (never doubled);
            default on for text when the tokenizer has an EOS, off for ids.
        columns: record fields kept as per-pair columns: :class:`ColumnSpec` or its text form
            (``"score_chosen"``, ``"NAME=FIELD"``, ``"NAME=FIELD:int64"``); float32 by default.
        force: replace an existing dataset. skip_invalid: write bad records to
            ``<output>.rejects.jsonl`` and go on instead of stopping at the first.
        allow_empty: write a dataset even when no pair is kept (else that is an error).
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
    """

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    shape: str | None = None
    prompt_template: str | None = None
    chat_template: str | None = None
    strict_chat_template: bool = False
    template_args: Any = None
    hh_marker: str = HH_MARKER
    tokenizer: Any = None
    vocab_size: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    columns: Any = ()
    force: bool = False
    skip_invalid: bool = False
    allow_empty: bool = False
    drop_identical: bool = False
    shard_bytes: int | None = None
    dedup_window: int | None = None
    workers: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    resume: bool = False
    progress: bool | None = None
    max_record_bytes: int | None = None
    pairs: str | None = None
    score_key: str | None = None

    def shape_options(self) -> ShapeOptions:
        """The record-reading part, with the field names the user gave marked explicit."""
        given = frozenset(k for k in ("prompt", "chosen", "rejected") if getattr(self, k) is not None)
        spec = FieldSpec(self.prompt or "prompt", self.chosen or "chosen", self.rejected or "rejected")
        args = tuple(sorted((self.template_args or {}).items()))
        return ShapeOptions(shape=self.shape, spec=spec, prompt_template=self.prompt_template,
                            chat_template=self.chat_template or "chatml", hh_marker=self.hh_marker,
                            template_args=args, strict_chat_template=self.strict_chat_template, explicit=given,
                            why="--shape" if self.shape else "")

    def column_specs(self) -> tuple[ColumnSpec, ...]:
        cols = tuple(c if isinstance(c, ColumnSpec) else ColumnSpec.parse(str(c)) for c in self.columns or ())
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise ValueError(f"column names must be distinct: {', '.join(names)}")
        return cols


def build(inputs: Any, output: str | os.PathLike, options: BuildOptions | None = None, *,
          on_record: Callable[[int], None] | None = None, **settings: Any) -> BuildReport:
    """Build a dataset at ``output`` from preference records.

    Args:
        inputs: files (``.jsonl``/``.jsonl.gz``/``.jsonl.zst``, ``.json`` arrays, ``.parquet``),
            directories of them, a Hugging Face ``datasets.Dataset``, or a list of dicts.
        output: the dataset directory to create (atomically).
        options: a :class:`BuildOptions`; ``settings`` (its field names as keywords, e.g.
            ``tokenizer="model/"``, ``skip_invalid=True``) override its fields.
        on_record: called with the number of pairs written after each block.

    Returns:
        A :class:`BuildReport`. Raises SourceError (file, line, field) on the first bad record
        unless ``skip_invalid``, and when no pair is kept (unless ``allow_empty``); nothing is left
        at ``output`` then.
    """
    try:
        o = dataclasses.replace(options or BuildOptions(), **settings)
    except TypeError:
        known = {f.name for f in dataclasses.fields(BuildOptions)}
        raise TypeError(f"build() got unknown settings {sorted(set(settings) - known)}; "
                        f"known: {', '.join(sorted(known))}") from None
    return _Build(inputs, Path(output), o, on_record).run()


class _Build:
    """One build, as named steps over shared state; :meth:`run` is the order they run in."""

    def __init__(self, inputs: Any, out: Path, o: BuildOptions, on_record: Callable[[int], None] | None) -> None:
        self.t0 = time.perf_counter()
        self.inputs, self.out, self.o, self.on_record = inputs, out, o, on_record
        if not 1 <= o.num_shards or not 0 <= o.shard_index < o.num_shards:
            raise ArgumentError(f"shard_index must be in [0, num_shards): got {o.shard_index} of {o.num_shards}")
        self.part = None if o.num_shards == 1 else {"num_shards": o.num_shards, "shard_index": o.shard_index}
        self.vocab_size, self.pad_id = o.vocab_size, o.pad_id
        self.shard_bytes, self.dedup_window = o.shard_bytes, o.dedup_window
        self.columns = o.column_specs()
        self.tok: Any = None
        self.vocab_note: str | None = None

    def run(self) -> BuildReport:
        o = self.o
        shape_opts = o.shape_options()
        self.tok = load_tokenizer(o.tokenizer) if isinstance(o.tokenizer, (str, os.PathLike)) else o.tokenizer
        self.sources = open_sources(self.inputs)
        if o.max_record_bytes is not None:
            for src in self.sources:
                if isinstance(src, JsonlSource):
                    src.max_record_bytes = o.max_record_bytes
        self._apply_sidecars()
        if not o.resume:  # before reading any input (--resume compares an existing dataset first)
            check_output(self.out, force=o.force)
        self.multi, multi_mode = self._detect_multi()
        if self.multi is not None:
            opts, mode = ShapeOptions(shape=None, spec=shape_opts.spec, prompt_template=o.prompt_template), multi_mode
        else:
            shape_opts = resolve_chat_template(shape_opts, self.tok, o.chat_template)
            opts, mode = _detect(self.sources, shape_opts, self.tok)
            check_chat_template(opts, self.tok, o.chat_template)
        self.plan = plan_build(opts, mode, self.tok, add_bos=o.add_bos, add_eos=o.add_eos,
                               skip_invalid=o.skip_invalid, drop_identical=o.drop_identical,
                               vocab_size=self.vocab_size, pad_id=self.pad_id, shard_bytes=self.shard_bytes,
                               dedup_window=self.dedup_window, columns=self.columns, multi=self.multi)
        self.opts, self.mode, self.tok = opts, self.plan.mode, self.plan.tokenizer
        if self.out.exists() or self.out.is_symlink():
            ident_now = self.tok.identity() if self.tok is not None else None
            if o.resume and _up_to_date(self.out, self.sources, self.plan.options, self.part, ident_now):
                return BuildReport(output=str(self.out), skipped=True, shape=self.opts.shape or "", mode=self.mode,
                                   part=self._part_text())
            if not o.force:
                raise DatasetExistsError(self.out, "and was built differently")
        report = self._new_report()
        manifest = self._write(report)
        finish_report(report, manifest)
        report.seconds = time.perf_counter() - self.t0
        return report

    # -- settings --------------------------------------------------------------------------------
    def _detect_multi(self) -> tuple[MultiOptions | None, str | None]:
        """Multi-completion input (``pairs`` given, or such records among the first ones without a
        forced ``shape``): its options and mode (``"text"``/``"ids"``), else ``(None, None)``."""
        o = self.o
        rule = PairRule.parse(o.pairs) if o.pairs is not None else None
        if rule is not None and o.shape is not None:
            raise ArgumentError(f"pairs={o.pairs!r} reads multi-completion records; it cannot be combined with "
                                f"shape={o.shape!r}")
        mspec = MultiSpec(prompt=o.prompt, score_key=o.score_key)
        mode = _detect_multi(self.sources, mspec, o.prompt_template) if o.shape is None else None
        if rule is None and mode is None:
            return None, None
        if o.prompt_template:
            PromptTemplate(o.prompt_template)  # a bad template fails here, before any block
        return MultiOptions(mspec, rule or PairRule("best-worst"), o.prompt_template), mode

    def _apply_sidecars(self) -> None:
        """Exports of datasets (``pairpack export``) carry their settings in a sidecar: rebuilding
        them takes vocabulary, special ids, tokenizer, shard size and columns from it. Several
        exports must agree; an input without a sidecar among exports is refused, since its ids
        could mean anything."""
        files = [s for s in self.sources if s.size]
        sides = [read_sidecar(s.path) for s in files]
        if not any(sides):
            return
        first = next(i for i, x in enumerate(sides) if x)
        side = sides[first]
        key = ("vocab_size", "pad_id", "bos_id", "eos_id", "token_dtype", "tokenizer", "columns")

        def tok_key(x: dict[str, Any]) -> dict[str, Any]:
            return {k: (fmt.tokenizer_key(x.get(k)) if k == "tokenizer" else x.get(k)) for k in key}

        for s, x in zip(files, sides):
            if x is None and self.tok is None and self.vocab_size is None:
                raise SourceError(f"this input has no export sidecar ({Path(s.path).name}.pairpack.json) while "
                                  f"{Path(files[first].path).name} has one: their ids may come from different "
                                  "tokenizers; pass --tokenizer or --vocab-size to build them together",
                                  path=s.path, reason="missing_sidecar")
            if x is not None and tok_key(x) != tok_key(side):
                diff = next(k for k in key if tok_key(x)[k] != tok_key(side)[k])
                raise SourceError(f"exported with other settings than {Path(files[first].path).name} "
                                  f"({diff}: {x.get(diff)!r} vs {side.get(diff)!r}); build them separately",
                                  path=s.path, reason="mixed_exports")
        if self.tok is None:
            self.tok = _sidecar_tokenizer(side, Path(files[first].path).parent)
        if self.vocab_size is None and self.tok is None:
            self.vocab_size = side.get("vocab_size")
        self.pad_id = side.get("pad_id") if self.pad_id is None else self.pad_id
        self.shard_bytes = side.get("shard_bytes") if self.shard_bytes is None else self.shard_bytes
        self.dedup_window = side.get("dedup_window") if self.dedup_window is None else self.dedup_window
        if not self.columns and side.get("columns"):
            self.columns = tuple(ColumnSpec(c["name"], c["name"], c["dtype"]) for c in side["columns"])

    def _part_text(self) -> str | None:
        return f"{self.o.shard_index}/{self.o.num_shards}" if self.part else None

    def _new_report(self) -> BuildReport:
        tok, job = self.tok, self.plan.job
        bos_id, eos_id = self.plan.writer["bos_id"], self.plan.writer["eos_id"]
        multi = self.multi
        report = BuildReport(output=str(self.out), shape="multi" if multi else self.opts.shape or "", mode=self.mode,
                             part=self._part_text(), pair_rule=str(multi.rule) if multi else None,
                             shape_reason="multi-completion records" if multi else self.opts.why,
                             columns=[f"{c.name} ({c.path}, {c.dtype})" for c in self.columns])
        if tok is None:
            report.tokenizer = "none: token ids stored as given"
        elif isinstance(tok, HFTokenizer):
            join = (f"; completions encoded as continuations (after {tok.join_anchor!r}, whose ids are dropped)"
                    if tok.join_anchor is not None else "")
            report.tokenizer = f"{tok.name} ({tok.path}, vocabulary {tok.vocab_size:,}){join}"
        else:
            report.tokenizer = f"{getattr(tok, 'name', type(tok).__name__)} (vocabulary {tok.vocab_size:,})"
        if self.mode == "text":
            report.template = self.opts.template_label()
            src = getattr(tok, "special_sources", {})
            report.bos = describe_special(tok, bos_id, src.get("bos")) + (
                ", prepended to prompts" if job.bos is not None else
                ", not added (--add-bos adds it)" if bos_id is not None else "")
            report.eos = describe_special(tok, eos_id, src.get("eos")) + (
                ", appended to completions" if job.eos is not None else
                ", not added" if eos_id is not None else "")
        return report

    # -- writing ---------------------------------------------------------------------------------
    def _write(self, report: BuildReport) -> fmt.Manifest:
        """Run every block of this part through the plan's job (in workers when it pays) and commit
        the dataset; on any error nothing is left at the output (but a rejects file explaining a
        build that kept no pair)."""
        o, out, job = self.o, self.out, self.plan.job
        plan, unit_info = _part_ranges(self.sources, o.num_shards, o.shard_index)
        report.input_bytes = total_bytes = sum(s.size for s in self.sources)
        n_workers = report.workers = _choose_workers(o.workers, self.sources, total_bytes)
        bar = Progress(total_bytes or None, enabled=o.progress)
        rejects = Rejects(rejects_path(out))
        writer = Writer(out, force=o.force, **self.plan.writer)
        pool: ProcessPoolExecutor | ThreadPoolExecutor | None = None
        feed = self._blocks(plan)
        results: Generator[tuple[tuple[int, BlockResult], int], None, None] | None = None
        try:
            writer.tokenizer = attach_tokenizer(writer.tmp, self.tok, writer.tokenizer)
            pool, results = _start(job, feed, n_workers)
            records = 0
            for (base_b, res), done in results:
                records += res.records
                add_result(writer, res, report, rejects if o.skip_invalid else None)
                if self.on_record is not None:
                    self.on_record(writer.num_pairs)
                bar.update(writer.num_pairs, base_b + done)
            if pool is not None:
                pool.shutdown()
                pool = None
            # a part of a split may cover no records (more parts than records): merge needs it anyway
            if writer.num_pairs == 0 and not o.allow_empty and (records or not self.part):
                if self.multi is not None and report.records_without_pairs:
                    raise _no_pairs_error(self.multi, report, self.sources)
                raise self._no_pairs(records, report, rejects)
            if self.tok is None and self.vocab_size is None:
                report.vocab_note = (f"no tokenizer and no --vocab-size: vocab_size guessed as the largest id + 1 "
                                     f"({writer.max_id + 1:,}); pass --vocab-size N (or --tokenizer) to record "
                                     "the real one")
            writer.provenance = {
                "pairpack_version": __version__,
                "inputs": [s.provenance() for s in self.sources],
                "options": self.plan.options,
                "mode": self.mode,
                **({"part": {**self.part, **unit_info}} if self.part else {}),
            }
            manifest = writer.commit()
            report.rejects_file = rejects.commit()
        except BaseException:
            bar.close()
            # the exception's traceback keeps this frame, and with it the generators, alive: close
            # them now, which stops and joins the input's read-ahead thread (sources._ReadAhead)
            if results is not None:
                results.close()
            feed.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            writer.abort()
            rejects.discard()
            raise
        bar.close()
        return manifest

    def _blocks(self, plan: list[tuple[Source, int, int | None]]) -> Generator[tuple[int, Block], None, None]:
        """(byte offset of the block's source in the whole input, block) over this part's plan."""
        offsets, base = {}, 0
        for s in self.sources:
            offsets[id(s)] = base
            base += s.size
        for s, lo, hi in plan:
            with closing(s.blocks(lo, hi)) as source_blocks:
                for b in source_blocks:
                    yield offsets[id(s)], b

    def _no_pairs(self, records: int, report: BuildReport, rejects: Rejects) -> SourceError:
        """The error of a build that kept no pair (its rejects file is kept, to be read)."""
        paths = ", ".join(Path(s.path).name for s in self.sources)
        if records == 0:
            msg = "the input holds no records"
        elif report.rejected:
            reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(report.rejected.items()))
            where = rejects.commit()  # kept, to be read: the dataset is not written
            msg = (f"no pair kept: every one of {records:,} records was rejected ({reasons}); the reasons are in "
                   f"{where}")
        else:
            msg = f"no pair kept: all {records:,} pairs were identical and --drop-identical dropped them"
        return SourceError(msg + " (allow_empty=True writes an empty dataset anyway)", path=paths, reason="no_pairs")


def _start(job: _Job, blocks: Iterator[tuple[int, Block]], n_workers: int
           ) -> tuple[ProcessPoolExecutor | ThreadPoolExecutor | None, Generator[tuple[tuple[int, BlockResult], int], None, None]]:
    """(pool or None, ((source offset, result), bytes done) per block in input order)."""
    if n_workers > 1 and _threads_suffice(job):
        # the C reader releases the GIL for the whole block: threads parallelise it with no
        # pickling of blocks and results between processes (which cost more than the parse)
        extractor = make_extractor(job.opts, job.tokenizer)
        pool: Any = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="pairpack-build")
        return pool, _ordered(lambda b, p=pool: p.submit(process_block, job, extractor, b), blocks, 2 * n_workers)
    if n_workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        if ctx.get_start_method() == "fork":
            # the parent's tokenizer threads must not be inherited mid-use; see tokenization.py
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker, initargs=(job,))
        return pool, _ordered(lambda b, p=pool: p.submit(_work, b), blocks, 2 * n_workers)
    extractor = make_extractor(job.opts, job.tokenizer)
    return None, (((base_b, process_block(job, extractor, b)), b.done_bytes) for base_b, b in blocks)


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
    """The error of a multi-completion build whose pair rule made no pair."""
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
            raise ArgumentError(f"workers must be >= 1, got {workers}")
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

    if fmt.tokenizer_key(m.tokenizer) != fmt.tokenizer_key(tok_ident):
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

