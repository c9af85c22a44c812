"""Planning a build: every decision that shapes the output, made once before the first block from
the first records of the whole input (shape, text or ids, multi-completion records, the chat
template, special ids, the writer's settings), and which units of the input a part of a split
build covers."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import format as fmt
from ..errors import ArgumentError, SourceError
from ..tokenization import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, ByteTokenizer, HFTokenizer
from .job import _U32, ColumnSpec, _Job
from .joins import check_boundary, default_boundary
from .multi import SCORE_COLUMNS, MultiOptions, MultiSpec, extract_multi, is_multi
from .shapes import PromptTemplate, ShapeOptions, detect_shape, make_extractor
from .templates import NAMED_CHAT_TEMPLATES, families_in_vocabulary
from .sources import Source

__all__ = ["BuildPlan", "plan_build", "attach_tokenizer", "resolve_chat_template", "check_chat_template"]

DETECT_RECORDS = 1000  # records looked at (from the start of the whole input) to fix shape and mode


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
                resolved = dataclasses.replace(r, detected_from=s.path) if s.size else r
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
               multi: MultiOptions | None = None, boundary: str | None = None) -> BuildPlan:
    """The plan of a build whose shape (``opts``) and mode were detected (:func:`_detect`); ``mode``
    None (nothing detected) means text with a tokenizer, ids without. ``add_bos`` None: the
    tokenizer config's ``add_bos_token`` for text, else off. ``multi``: the input is
    multi-completion records (pairs by a rule, score columns; no other columns). ``add_eos`` None:
    on for text except chat records (the template's end of turn closes their completions, as TRL
    takes them). ``boundary``: the convention of text pairs whose join merges tokens (None: the
    shape's default, see :mod:`pairpack.ingest.joins`)."""
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
    want_eos = add_eos if add_eos is not None else (mode == "text" and opts.shape != "chat")
    join = check_boundary(boundary) or default_boundary(opts.shape)
    job = _Job(opts=opts, tokenizer=tok if mode == "text" else None, mode=mode, limit=limit,
               bos=bos_id if want_bos else None, eos=eos_id if want_eos else None, drop_identical=drop_identical,
               columns=columns, multi=multi, boundary=join)
    options = {"add_bos": add_bos, "add_eos": add_eos, "skip_invalid": skip_invalid, "drop_identical": drop_identical,
               "vocab_size": vocab_size, "pad_id": pad_id, "shard_bytes": shard_bytes, "dedup_window": dedup_window}
    if columns:
        options["columns"] = [dataclasses.asdict(c) for c in columns]
    options.update(multi.to_json() if multi is not None else opts.to_json())
    if boundary is not None:
        options["boundary"] = boundary
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


def check_chat_template(opts: ShapeOptions, tok: Any, given: str | None, markers_as_text: bool = False
                        ) -> str | None:
    """Check a named chat template against a Hugging Face tokenizer's vocabulary; returns what the
    summary adds to the template line (the families whose markers are tokens of the vocabulary, or
    a warning), or None.

    Chat records read with chatml by default are refused when chatml's markers are not tokens of
    the tokenizer (they would become plain-text tokens): the error names the families whose
    markers are. A template named with ``given`` whose markers are not tokens is refused unless
    ``markers_as_text`` (then the note is a warning). Jinja templates and the byte tokenizer are
    not checked."""
    named = NAMED_CHAT_TEMPLATES.get(opts.chat_template)
    if opts.shape != "chat" or opts.chat_template_name is not None or named is None \
            or not isinstance(tok, HFTokenizer):
        return None
    families = families_in_vocabulary(tok.has_token)
    found = (f"families whose markers are tokens of {tok.name}: {', '.join(families)}" if families else
             f"no named family's markers are tokens of {tok.name}")
    if given is None:
        if "chatml" not in families:
            raise ArgumentError(f"chat records need a chat template: the tokenizer {tok.name} has none (no "
                                f"{TOKENIZER_CONFIG_FILE} with a chat_template beside it) and chatml's markers are "
                                f"not tokens of it (they would become plain-text tokens); {found}. Pass "
                                f"--chat-template {'|'.join(families) or 'NAME'} (names: "
                                f"{', '.join(NAMED_CHAT_TEMPLATES)}) or a Jinja FILE, or --tokenizer MODEL_DIR")
        return f"the default: {tok.name} has no template of its own; {found}"
    missing = [m for m in named.markers if not tok.has_token(m)]
    if not missing:
        return None
    what = (f"the {named.name} template's markers {', '.join(missing)} are not tokens of {tok.name}: they are "
            "encoded as plain text")
    if not markers_as_text:
        raise ArgumentError(f"--chat-template {named.name}: {what}; {found}. Choose a template of this "
                            "tokenizer's family, or pass --markers-as-text to build with them as text")
    return f"warning: {what} (--markers-as-text)"
