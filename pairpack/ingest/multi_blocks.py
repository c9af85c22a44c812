"""Multi-completion blocks (see :mod:`pairpack.ingest.multi`): each record's prompt and distinct
completions encoded once, pairs made by the rule (:func:`_process_multi`, in workers); their groups
handed to the writer (:func:`_write_groups`, in the main process); and the error of a rule that made
no pair at all."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SourceError
from ..tokenization import encode_continuations
from ..write.writer import Writer, check_ids
from .job import BlockResult, Group, _Error, _Job, _seg_ids
from .multi import MultiOptions, extract_multi
from .report import BuildReport
from .shapes import PromptTemplate
from .sources import Source, record_text


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
