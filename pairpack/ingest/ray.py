"""Building on a cluster: a pairpack build as the last stage of a Ray Data pipeline.

Imported as ``pairpack.ray`` (the extra ``pairpack[ray]``)::

    ds = ray.data.read_json("s3://corpus/*.jsonl").filter(keep)
    report = pairpack.ray.build(ds, "/shared/data/pairs", tokenizer="tokenizer.json")
    # or, as a stage of a pipeline:  ds.write_datasink(pairpack.ray.Datasink(path, tokenizer=...))

Each Ray write task turns its blocks into pairs with the build's own block processing
(:func:`pairpack.ingest.blocks.process_block`, the tokenizer loaded once per worker process) and
writes them as one *part*, a complete dataset written by :class:`pairpack.write.writer.Writer`,
under a staging directory beside the target. When every task has finished, the driver combines
the parts in task order: their shard files are renamed into the new dataset (no token is copied
or re-hashed; :mod:`pairpack.write.combine`) and the dataset is installed atomically (FORMAT.md
§9 W1). A failed job removes the staging directory and leaves the target path as it was.

What equals what:

* Ray's ``preserve_order`` on: the pairs are those of ``pairpack.build`` of the same records in
  the same order, pair for pair, with the same token dtype, vocabulary, special ids and tokenizer.
  The shard layout differs: shards are cut at task boundaries too, and a prompt repeated across
  two tasks is stored twice (prompt sharing, FORMAT.md §7.2, is per shard). With
  ``byte_identical=True`` the driver re-lays the parts out as one sequential build would (one
  pass over the tokens, a copy): every data file, hence the fingerprint (§7.3), then equals the
  single-machine build's; the manifests differ only in provenance.
* ``preserve_order`` off: the same pairs as a multiset, in the order the tasks happened to run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .. import format as fmt
from .._version import __version__
from ..errors import ArgumentTypeError, PairpackError, StateError, import_optional
from ..format.fsio import check_output, clean_stale_temps, temp_path_for
from ..tokenization import ByteTokenizer, HFTokenizer, load_tokenizer
from ..write.combine import combine_parts
from ..write.writer import Writer
from .blocks import process_block
from .build import BuildOptions, add_result
from .plan import (
    DETECT_RECORDS,
    BuildPlan,
    _detect,
    attach_tokenizer,
    check_chat_template,
    plan_build,
    resolve_chat_template,
)
from .rejects import Rejects, rejects_path
from .report import BuildReport, finish_report
from .shapes import FieldSpec, ShapeOptions, make_extractor
from .sources import Block, RecordsSource

import_optional("ray.data", feature="pairpack.ray (a build on a Ray cluster)", extra="ray")
import ray  # noqa: E402 - present: checked just above
import ray.data  # noqa: E402
from ray.data.block import BlockAccessor  # noqa: E402

__all__ = ["Datasink", "build"]

RAY_INPUT = "<ray dataset>"  # the "file" of records that come from a Ray dataset
# Ray's blocks of a JSON corpus hold a few hundred rows; a task per block cost the 2-core benchmark
# (tools/bench_ray.py) 18-41% more machine CPU per pair and 17-32% of its pairs/s: tasks of at least
# 10,000 rows (a part of ~10 MB of tokens at ~500 tokens a pair) keep Ray's per-task cost small
ROWS_PER_TASK = 10_000
_STEP_PAIRS = 1 << 16  # pairs re-laid out per writer call (byte_identical)

# build() options that make no sense for a Ray dataset (the engine reads and schedules)
# multi-completion records (pairs, score_key) are not read by the Ray sink: build them with pairpack.build
_NOT_HERE = ("inputs", "output", "workers", "num_shards", "shard_index", "resume", "progress", "on_record",
             "max_record_bytes", "allow_empty", "pairs", "score_key")


# --- per worker process -----------------------------------------------------------------------
# A Ray worker process runs many write tasks: the tokenizer is loaded by the first of them and
# kept (keyed by its file and hash), never shipped with the tasks' arguments.
_TOKENIZERS: dict[tuple[Any, ...], Any] = {}
_LOADS = [0]  # tokenizer files loaded by this process (reported per task: one per process expected)
_EXTRACTORS: dict[tuple[Any, ...], Callable[[Any], tuple]] = {}


def _tokenizer_key(tok: Any) -> tuple[Any, ...] | None:
    """A small picklable key that rebuilds ``tok`` in a worker (None: ship the object itself)."""
    if tok is None:
        return ("none",)
    if isinstance(tok, ByteTokenizer):
        return ("bytes",)
    if isinstance(tok, HFTokenizer):
        return ("huggingface", str(tok.path), tuple(sorted(tok._opts.items())), tok.hash)
    return None


def _worker_tokenizer(key: tuple[Any, ...]) -> Any:
    tok = _TOKENIZERS.get(key)
    if tok is None and key[0] != "none":
        # one tokenizer thread per task: Ray's tasks are the parallelism (as the build's workers)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if key[0] == "bytes":
            tok = ByteTokenizer()
        else:  # the same file as on the driver, or a clear error (shared filesystem expected)
            tok = HFTokenizer(key[1], expected_hash=key[3], **dict(key[2]))
            _LOADS[0] += 1
        _TOKENIZERS[key] = tok
    return tok


def _extractor(opts: ShapeOptions, tok: Any, tok_key: tuple[Any, ...] | None) -> Callable[[Any], tuple]:
    """The record extractor for ``opts``, made once per worker process (a chat template file is
    read and compiled once)."""
    if tok_key is None:
        return make_extractor(opts, tok)
    ek = (tok_key, json.dumps(opts.to_json(), sort_keys=True))
    ext = _EXTRACTORS.get(ek)
    if ext is None:
        ext = _EXTRACTORS[ek] = make_extractor(opts, tok)
    return ext


def _plain(value: Any) -> Any:
    """A row value as the build reads JSON: Arrow fills absent keys with None when it unifies
    the rows' types, so None-valued keys are dropped (a missing and a null field are rejected
    alike) in records and in lists of records (chat messages). Lists of ids are not walked."""
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if type(value) is list and value and type(value[0]) is dict:
        return [_plain(v) for v in value]
    return value


def _rows(block: Any) -> list[dict[str, Any]]:
    return [_plain(r) for r in BlockAccessor.for_block(block).to_arrow().to_pylist()]


# --- the sink ---------------------------------------------------------------------------------
class Datasink(ray.data.Datasink):
    """Write a Ray dataset of preference records as one pairpack dataset at ``path``.

    ``ray_dataset.write_datasink(pairpack.ray.Datasink(path, **options))``; the options are those
    of :func:`pairpack.build` (``shape``, ``prompt``/``chosen``/``rejected``, ``prompt_template``,
    ``chat_template``, ``hh_marker``, ``tokenizer``, ``vocab_size``, ``pad_id``, ``add_bos``,
    ``add_eos``, ``skip_invalid``, ``drop_identical``, ``shard_bytes``, ``dedup_window``, ``force``)
    plus:

    Args:
        path: the dataset directory to create, on a filesystem every node sees (the parts are
            written beside it, under ``.<name>.pairpack-tmp-<pid>-<hex>``).
        byte_identical: re-lay the parts out as one sequential build would (a copy of the tokens
            on the driver): the data files and fingerprint then equal ``pairpack.build``'s of the
            same records in the same order (with ``preserve_order``). Default: combine the parts
            by renaming their files (no copy); the pairs are the same, the shards are cut at task
            boundaries too.
        rows_per_task: the least rows Ray gives each write task (its ``min_rows_per_write``;
            default 10,000: Ray bundles its blocks, a few hundred rows each from a JSON corpus,
            so that the per-task cost stays small and parts are shards of useful size); None:
            Ray's blocks as they come, a task and at least one shard per block.
        sample: records that fix the shape and the text/ids mode before any task runs, as the
            first records of the input fix them for ``pairpack.build`` (:func:`build` passes the
            dataset's first 1,000 rows). Without it each task decides from its own first rows,
            and the job fails at the end if two tasks decided differently.

    After the write, :attr:`report` is the job's :class:`~pairpack.ingest.report.BuildReport`
    (pairs, rejects, identical pairs, tokens saved by prompt sharing, over every task) and
    :attr:`tasks` each write task's figures (rows, pairs, worker, CPU seconds). Rejected
    records (``skip_invalid=True``) of every task are gathered into ``<path>.rejects.jsonl``:
    ``line`` is the record's 1-based row in the dataset when ``preserve_order`` is on (else null),
    ``task``/``task_row`` the write task and the row within it.

    A failed job (Ray calls :meth:`on_write_failed`) removes the staging directory. An interrupt
    (KeyboardInterrupt) passes by Ray's clean-up: :func:`build` handles it, and otherwise the next
    write to the same path removes the staging of a driver that is gone.
    """

    def __init__(self, path: str | os.PathLike, *, byte_identical: bool = False,
                 rows_per_task: int | None = ROWS_PER_TASK,
                 sample: Iterable[dict[str, Any]] | None = None, **options: Any) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(BuildOptions)}  # the options accepted here
        known = set(defaults) - set(_NOT_HERE)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ArgumentTypeError(f"pairpack.ray.Datasink: unknown option(s) {unknown}; options are those of "
                            f"pairpack.build: {sorted(known)}")
        bo = BuildOptions(**options)
        self.path = Path(path).absolute()
        self.force = bo.force
        self.skip_invalid = bo.skip_invalid
        self.byte_identical = byte_identical
        self.rows_per_task = rows_per_task
        self.report: BuildReport | None = None
        self.tasks: list[dict[str, Any]] = []  # per write task: rows, pairs, worker, ... (after the write)
        tok = bo.tokenizer
        self._tok = load_tokenizer(tok) if isinstance(tok, (str, os.PathLike)) else tok
        self._chat_template = bo.chat_template
        self._markers_as_text = bo.markers_as_text
        self._shape_opts = resolve_chat_template(bo.shape_options(), self._tok, bo.chat_template)
        self._plan_args = {k: getattr(bo, k) for k in ("vocab_size", "pad_id", "add_bos", "add_eos", "boundary",
                                                       "skip_invalid", "drop_identical", "shard_bytes", "dedup_window")}
        self._plan_args["columns"] = bo.column_specs()
        self._plan: BuildPlan | None = None
        if sample is not None:
            recs = list(sample)
            if recs:
                self._plan = self._make_plan(recs, self._tok)
                self._tok = self._plan.tokenizer  # the byte-level one for text without a tokenizer
        self._staging = temp_path_for(self.path)  # fixed here: the tasks receive it with the sink
        self._ordered: bool | None = None  # the job's preserve_order (pairpack.ray.build reads the dataset's)
        self._t0 = time.perf_counter()

    # the tokenizer travels as its key (file, hash), never as a loaded object
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        key = _tokenizer_key(self._tok)
        state["_tok_key"] = key
        state["_tok"] = None if key is not None else self._tok
        if state["_plan"] is not None:
            state["_plan"] = dataclasses.replace(self._plan, job=dataclasses.replace(self._plan.job, tokenizer=None),
                                                 tokenizer=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _make_plan(self, records: list[dict[str, Any]], tok: Any) -> BuildPlan:
        opts, mode = _detect([RecordsSource([_plain(r) for r in records[:DETECT_RECORDS]])], self._shape_opts, tok)
        check_chat_template(opts, tok, self._chat_template, self._markers_as_text)
        return plan_build(opts, mode, tok, **self._plan_args)

    # driver ---------------------------------------------------------------------------------
    def on_write_start(self, schema: Any = None) -> None:
        check_output(self.path, force=self.force)  # a user's directory or file is never replaced (§9 W8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.path)  # staging left by a killed driver
        self._staging.mkdir(exist_ok=True)
        self._t0 = time.perf_counter()

    def get_name(self) -> str:
        return "pairpack"

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_task

    def on_write_failed(self, error: Exception) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def on_write_complete(self, write_result: Any) -> None:
        try:
            self.report = self._commit(write_result)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)

    # task -----------------------------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """One write task: its blocks become part ``part-<task>`` under the staging directory."""
        cpu0, t0 = time.process_time(), time.time()
        idx = int(ctx.task_idx)
        name = f"part-{idx:06d}"
        if not self._staging.is_dir():  # the job failed and was cleaned up: write nothing
            raise StateError(f"{self._staging}: the staging directory is gone (the job was aborted)")
        where = f"{RAY_INPUT} write task {idx}"
        tok_key = getattr(self, "_tok_key", _tokenizer_key(self._tok))
        # loaded once per worker process (the sink carries only the key)
        tok = _worker_tokenizer(tok_key) if tok_key is not None else self._tok
        plan = self._plan
        if plan is not None:
            job_tok = tok if plan.mode == "text" else None
            plan = dataclasses.replace(plan, tokenizer=tok, job=dataclasses.replace(plan.job, tokenizer=job_tok))
        report = BuildReport(output=name)
        rejects = Rejects(self._staging / f"{name}.rejects.jsonl") if self.skip_invalid else None
        writer: Writer | None = None
        rows = 0
        detected = None
        try:
            for block in blocks:
                recs = _rows(block)
                if not recs:
                    continue
                if plan is None:  # no sample: this task decides from its own first rows
                    plan = self._make_plan(recs, tok)
                    detected = (plan.job.opts.to_json(), plan.mode)
                if writer is None:
                    # force: a retried task replaces what an earlier attempt of it left
                    writer = Writer(self._staging / name, force=True, **plan.writer)
                    job = plan.job
                    extractor = _extractor(job.opts, plan.tokenizer, _tokenizer_key(plan.tokenizer))
                b = Block(where, rows + 1, records=[(rows + i + 1, r) for i, r in enumerate(recs)])
                rows += len(recs)
                add_result(writer, process_block(job, extractor, b), report, rejects)
            pairs = 0
            if writer is not None:
                writer.provenance = {"pairpack_version": __version__, "mode": plan.mode, "options": plan.options,
                                     "ray_task": {"index": idx, "rows": rows}}
                pairs = writer.commit().num_pairs
            rej = rejects.commit() if rejects is not None else None
        except BaseException:
            if writer is not None:
                writer.abort()
            if rejects is not None:
                rejects.discard()
            raise
        return {"task": idx, "part": name if writer is not None else None, "rows": rows, "pairs": pairs,
                "tokens": report.tokens, "rejected": dict(report.rejected), "identical": report.identical,
                "identical_dropped": report.identical_dropped, "rejects": Path(rej).name if rej else None,
                "detected": detected, "worker": f"{socket.gethostname()}:{os.getpid()}",
                "tokenizer_loads": _LOADS[0],
                "cpu_seconds": time.process_time() - cpu0,  # reads included: Ray fuses them into the task
                "started": t0, "finished": time.time()}  # wall clock (epoch seconds): how tasks overlapped

    # driver: the commit -----------------------------------------------------------------------
    def _commit(self, write_result: Any) -> BuildReport:
        rets = self.tasks = sorted(write_result.write_returns, key=lambda r: r["task"])
        ordered = self._ordered
        if ordered is None:
            ordered = bool(ray.data.DataContext.get_current().execution_options.preserve_order)
        plan = self._driver_plan(rets)
        parts = [self._staging / r["part"] for r in rets if r["part"] is not None]
        report = BuildReport(output=str(self.path), shape=plan.job.opts.shape or "", mode=plan.mode)
        for r in rets:
            report.rejected.update(r["rejected"])
            report.identical += r["identical"]
            report.identical_dropped += r["identical_dropped"]
            report.tokens += r["tokens"]
        report.workers = len({r["worker"] for r in rets})
        report.tasks = len(rets)
        report.input_bytes = int(write_result.size_bytes)
        rows = sum(r["rows"] for r in rets)
        provenance = {"pairpack_version": __version__,
                      "inputs": [{"path": RAY_INPUT, "rows": rows}],
                      "options": plan.options, "mode": plan.mode,
                      "ray": {"tasks": len(rets), "preserve_order": ordered,
                              "layout": "build" if self.byte_identical else "parts"}}
        rejects = Rejects(rejects_path(self.path))
        try:
            self._gather_rejects(rets, rejects, ordered)
            if self.byte_identical or not parts:
                manifest = self._relayout(parts, plan, provenance)
            else:
                manifest = combine_parts(parts, self.path, force=self.force, how="move", provenance=provenance,
                                         attach=lambda d: attach_tokenizer(d, plan.tokenizer,
                                                                           plan.writer["tokenizer"]))
            report.rejects_file = rejects.commit()
        except BaseException:
            rejects.discard()
            raise
        finish_report(report, manifest)
        report.seconds = time.perf_counter() - self._t0
        return report

    def _driver_plan(self, rets: list[dict[str, Any]]) -> BuildPlan:
        if self._plan is not None:
            return self._plan
        seen = {json.dumps(r["detected"], sort_keys=True): r for r in rets if r["detected"] is not None}
        if len(seen) > 1:
            a, b = list(seen.values())[:2]
            raise StateError(f"write tasks {a['task']} and {b['task']} read the records differently "
                             f"({a['detected']} vs {b['detected']}); pass shape= (and tokenizer=) to the "
                             f"Datasink, or use pairpack.ray.build, which fixes them from the first rows")
        if not seen:  # no rows at all: an empty dataset, read as ids
            return plan_build(ShapeOptions(shape=self._shape_opts.shape or "fields", spec=self._shape_opts.spec),
                              "text" if self._tok is not None else "ids", self._tok, **self._plan_args)
        opts_json, mode = next(iter(seen.values()))["detected"]
        so = self._shape_opts
        # the detected shape and field names (detection may name the fields of a known layout)
        opts = dataclasses.replace(so, shape=opts_json["shape"], prompt_template=opts_json["prompt_template"],
                                   spec=FieldSpec(opts_json["prompt"], opts_json["chosen"], opts_json["rejected"]))
        return plan_build(opts, mode, self._tok, **self._plan_args)

    def _gather_rejects(self, rets: list[dict[str, Any]], rejects: Rejects, ordered: bool) -> None:
        """Every task's rejects, in task order, each with its row in the dataset (when ordered)."""
        base = 0
        for r in rets:
            if r["rejects"] is not None:
                with open(self._staging / r["rejects"], encoding="utf-8") as f:
                    for line in f:
                        e = json.loads(line)
                        e["task"], e["task_row"] = r["task"], e["line"]
                        e["file"], e["line"] = RAY_INPUT, base + e["line"] if ordered else None
                        rejects.add(e)
            base += r["rows"]

    def _relayout(self, parts: list[Path], plan: BuildPlan, provenance: dict[str, Any]) -> fmt.Manifest:
        """The parts' pairs, in order, through one writer: the files of one sequential build."""
        writer = Writer(self.path, force=self.force, **plan.writer)
        try:
            writer.tokenizer = attach_tokenizer(writer.tmp, plan.tokenizer, writer.tokenizer)
            for part in parts:
                for tokens, lengths in _part_pairs(part):
                    writer.add_batch(tokens, lengths)
            writer.provenance = provenance
            return writer.commit()
        except BaseException:
            writer.abort()
            raise


def _part_pairs(root: Path) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """A part's pairs in order as (tokens, lengths): each pair's prompt, chosen and rejected ids
    back to back (shared prompts expanded again), lengths int64 ``(3, n)``."""
    m = fmt.read_manifest(root)
    for s in m.shards:
        toks = np.load(fmt.resolve_file(root, s.files["tokens"].path), mmap_mode="r")
        starts = np.load(fmt.resolve_file(root, s.files["starts"].path), mmap_mode="r")
        lengths = np.load(fmt.resolve_file(root, s.files["lengths"].path), mmap_mode="r")
        for a in range(0, s.num_pairs, _STEP_PAIRS):
            st = np.asarray(starts[:, a:a + _STEP_PAIRS]).T.reshape(-1)  # p, c, r of each pair
            ln = np.asarray(lengths[:, a:a + _STEP_PAIRS])
            seg = ln.T.reshape(-1)
            out_start = np.cumsum(seg) - seg
            idx = np.repeat(st - out_start, seg) + np.arange(int(seg.sum()))
            yield np.asarray(toks[idx]), ln


# --- one call ---------------------------------------------------------------------------------
def build(ray_dataset: Any, path: str | os.PathLike, *, byte_identical: bool = False,
          ray_remote_args: dict[str, Any] | None = None, concurrency: int | None = None,
          **options: Any) -> BuildReport:
    """Build the dataset at ``path`` from a Ray dataset of preference records.

    The shape and the text/ids mode are fixed from the dataset's first 1,000 rows, as
    ``pairpack.build`` fixes them from the first records of its input; then
    ``ray_dataset.write_datasink(Datasink(path, ...))`` runs the job. Options: those of
    :class:`Datasink`; ``ray_remote_args`` and ``concurrency`` go to ``write_datasink``.
    Returns the job's :class:`~pairpack.ingest.report.BuildReport`; on any error (a task failing,
    a bad record without ``skip_invalid``, an interrupt) nothing is left at ``path`` and no
    staging directory remains.
    """
    t0 = time.perf_counter()
    p = Path(path)
    check_output(p, force=bool(options.get("force", False)))
    sink = Datasink(path, byte_identical=byte_identical, sample=ray_dataset.take(DETECT_RECORDS), **options)
    sink._ordered = bool(ray_dataset.context.execution_options.preserve_order)
    try:
        ray_dataset.write_datasink(sink, ray_remote_args=ray_remote_args, concurrency=concurrency)
    except BaseException as e:  # an interrupt skips Ray's on_write_failed (it catches Exception only)
        sink.on_write_failed(None)  # type: ignore[arg-type]
        cause = getattr(e, "cause", None)  # a task's own error, without Ray's wrapping and traceback
        if isinstance(cause, PairpackError):
            raise cause from None
        raise
    assert sink.report is not None  # internal invariant: on_write_complete ran
    sink.report.seconds = time.perf_counter() - t0
    return sink.report
