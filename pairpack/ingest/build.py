"""``pairpack build``: inputs -> records -> token ids -> an atomic dataset (the build driver).

Pipeline: sources (:mod:`pairpack.ingest.sources`) cut the input into blocks of consecutive records
(raw JSONL bytes, or parsed records); each block is parsed, shaped (:mod:`pairpack.ingest.shapes`),
tokenized and checked as a whole by :func:`pairpack.ingest.blocks.process_block`, in worker
processes when ``workers > 1`` (worker threads for pre-tokenized JSONL read by the C reader, which
runs without the GIL); the main process takes the results *in input order* and hands each block's
ids to :meth:`pairpack.write.writer.Writer.add_batch` (:func:`add_result`). Every decision that
shapes the output (shape, text or ids mode, special ids) is made once, before any block is
processed, from the first records of the whole input (:mod:`pairpack.ingest.plan`), so the dataset
is byte-identical whatever the number of workers, and the parts of a ``num_shards`` split agree
with each other. Memory stays flat: a bounded number of blocks is in flight, and the writer spills
to disk.

The other files of the build, one job each: :mod:`~pairpack.ingest.report` (the summary),
:mod:`~pairpack.ingest.rejects` (``--skip-invalid``'s file), :mod:`~pairpack.ingest.job` (what a
block is given and gives back), :mod:`~pairpack.ingest.blocks` and
:mod:`~pairpack.ingest.multi_blocks` (block processing), :mod:`~pairpack.ingest.plan` (planning)
and :mod:`~pairpack.ingest.sidecars` (rebuilding exports).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

from .. import format as fmt
from .._version import __version__
from ..errors import ArgumentError, ArgumentTypeError, DatasetExistsError, PairpackError, SourceError
from ..format.fsio import check_output
from ..progress import Progress
from ..tokenization import HFTokenizer, describe_special, load_tokenizer
from ..write.writer import Writer
from .blocks import _init_worker, _threads_suffice, _work, process_block
from .job import BlockResult, ColumnSpec, _Job
from .multi import MultiOptions, MultiSpec, PairRule
from .multi_blocks import _no_pairs_error, _write_groups
from .plan import (
    BuildPlan,
    _detect,
    _detect_multi,
    _part_ranges,
    attach_tokenizer,
    check_chat_template,
    plan_build,
    resolve_chat_template,
)
from .rejects import Rejects, rejects_path
from .report import BuildReport, finish_report
from .shapes import HH_MARKER, FieldSpec, PromptTemplate, ShapeOptions, make_extractor
from .sidecars import WriteSettings, apply_sidecars
from .sources import Block, JsonlSource, Source, open_sources

__all__ = ["build", "BuildOptions", "BuildReport", "BuildPlan", "ColumnSpec", "plan_build", "add_result",
           "resolve_chat_template", "check_chat_template",
           "attach_tokenizer", "finish_report", "Rejects", "rejects_path", "process_block", "BlockResult"]


PARALLEL_MIN_BYTES = 4 << 20
# record errors that a file of another shape than the detected one gives
_SHAPE_REASONS = frozenset({"missing_field", "wrong_type", "mixed_types", "hh_no_marker", "chat_message",
                            "chat_no_assistant"})  # with workers=None, smaller inputs are built in-process (no start-up cost)



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
    report.boundary_pairs += res.boundary_pairs
    if report.boundary_example is None and res.boundary_example is not None:
        report.boundary_example = res.boundary_example
    if res.groups is not None:
        _write_groups(writer, res, report)
    if res.lengths.shape[1]:
        writer.add_batch(res.tokens, res.lengths, res.columns)
        report.tokens += len(res.tokens)


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
        chat_template: a named template (``chatml``, ``llama3``, ``llama2``, ``mistral``, ``phi3``,
            ``gemma``, ``zephyr``, ``hh``: :mod:`pairpack.ingest.templates`), a Jinja template file
            or a ``tokenizer_config.json``, or ``"tokenizer"``; None: the tokenizer's own template
            when it has one (a model directory's ``tokenizer_config.json``), else chatml where
            chatml's markers are tokens of the tokenizer (or for the byte tokenizer); other
            tokenizers must be given one (the error names the families whose markers are tokens).
        markers_as_text: build with a named template whose markers are not tokens of the
            tokenizer (encoded as plain text; the summary warns), instead of refusing it.
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
            default on for text when the tokenizer has an EOS, except chat records (the template's
            end of turn closes their completions, as TRL takes them), off for ids.
        boundary: text pairs whose rows, tokenized whole, merge tokens across the end of the
            prompt: ``"prompt"`` keeps the prompt as tokenized alone (rows then differ from the
            whole row's tokenization), ``"row"`` stores rows exactly as tokenized whole (TRL's
            convention; the prompt is cut to the common prefix). None: ``row`` for chat records,
            ``prompt`` otherwise. Such pairs are counted in the report either way
            (:mod:`pairpack.ingest.joins`).
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
    boundary: str | None = None
    markers_as_text: bool = False
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
        raise ArgumentTypeError(f"build() got unknown settings {sorted(set(settings) - known)}; "
                        f"known: {', '.join(sorted(known))}") from None
    return _Build(inputs, Path(output), o, on_record).run()


class _Build:
    """One build, as named steps over shared state; :meth:`run` is the order they run in."""

    def __init__(self, inputs: Any, out: Path, o: BuildOptions, on_record: Callable[[int], None] | None) -> None:
        self.t0 = time.perf_counter()
        self.inputs, self.out, self.o, self.on_record = inputs, out, o, on_record
        if not 1 <= o.num_shards or not 0 <= o.shard_index < o.num_shards:
            raise ArgumentError(f"--shard-index must be in [0, --num-shards): got {o.shard_index} of {o.num_shards} "
                                "(shard_index, num_shards in Python)")
        self.part = None if o.num_shards == 1 else {"num_shards": o.num_shards, "shard_index": o.shard_index}
        self.vocab_size, self.pad_id = o.vocab_size, o.pad_id
        self.shard_bytes, self.dedup_window = o.shard_bytes, o.dedup_window
        self.columns = o.column_specs()
        self.tok: Any = None
        self.vocab_note: str | None = None
        self.template_note: str | None = None

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
            self.template_note = check_chat_template(opts, self.tok, o.chat_template, o.markers_as_text)
        self.plan = plan_build(opts, mode, self.tok, add_bos=o.add_bos, add_eos=o.add_eos,
                               skip_invalid=o.skip_invalid, drop_identical=o.drop_identical,
                               vocab_size=self.vocab_size, pad_id=self.pad_id, shard_bytes=self.shard_bytes,
                               dedup_window=self.dedup_window, columns=self.columns, multi=self.multi,
                               boundary=o.boundary)
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
            raise ArgumentError(f"--pairs {o.pairs} reads multi-completion records; it cannot be combined with "
                                f"--shape {o.shape} (pairs=, shape= in Python)")
        mspec = MultiSpec(prompt=o.prompt, score_key=o.score_key)
        mode = _detect_multi(self.sources, mspec, o.prompt_template) if o.shape is None else None
        if rule is None and mode is None:
            return None, None
        if o.prompt_template:
            PromptTemplate(o.prompt_template)  # a bad template fails here, before any block
        return MultiOptions(mspec, rule or PairRule("best-worst"), o.prompt_template), mode

    def _apply_sidecars(self) -> None:
        """Exports' sidecars complete the settings not given (:mod:`pairpack.ingest.sidecars`)."""
        s = apply_sidecars(self.sources, WriteSettings(self.tok, self.vocab_size, self.pad_id, self.shard_bytes,
                                                       self.dedup_window, self.columns))
        self.tok, self.vocab_size, self.pad_id = s.tok, s.vocab_size, s.pad_id
        self.shard_bytes, self.dedup_window, self.columns = s.shard_bytes, s.dedup_window, s.columns

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
            report.template = self.opts.template_label() + (f" ({self.template_note})" if self.template_note else "")
            src = getattr(tok, "special_sources", {})
            report.bos = describe_special(tok, bos_id, src.get("bos")) + (
                ", prepended to prompts" if job.bos is not None else
                ", not added (--add-bos adds it)" if bos_id is not None else "")
            report.eos = describe_special(tok, eos_id, src.get("eos")) + (
                ", appended to completions" if job.eos is not None else
                ", not added: chat completions end with the template's end of turn (--add-eos adds it)"
                if eos_id is not None and self.opts.shape == "chat" and self.o.add_eos is None else
                ", not added" if eos_id is not None else "")
            if multi is None:
                report.boundary = job.boundary
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
                try:
                    add_result(writer, res, report, rejects if o.skip_invalid else None)
                except SourceError as e:
                    raise self._shape_origin(e) from None
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

    def _shape_origin(self, e: SourceError) -> SourceError:
        """``e`` naming the file whose first records fixed the shape and mode, when ``e`` is a record
        of another file that does not fit them (a folder of files of different shapes)."""
        origin = self.opts.detected_from
        if not origin or self.multi is not None or e.path == origin or e.reason not in _SHAPE_REASONS:
            return e
        why = f" ({self.opts.why})" if self.opts.why else ""
        return SourceError(f"{e.detail}. The shape {self.opts.shape} and {self.mode} mode were detected from the first "
                           f"records of {Path(origin).name}{why}: build files of other shapes separately (or force "
                           "one with --shape and the field flags)", path=e.path, line=e.line, field=e.field,
                           reason=e.reason)

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
        return SourceError(msg + " (--allow-empty writes an empty dataset anyway; allow_empty=True in Python)", path=paths, reason="no_pairs")


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
