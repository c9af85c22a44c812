"""``pairpack build``: input files -> records -> token ids -> an atomic dataset.

Streaming end to end: one record at a time from each input, tokens and index spilled to disk by
the :class:`~pairpack.writer.Writer`, so memory stays flat whatever the input size.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .errors import DatasetExistsError, PairpackError, SourceError
from .progress import Progress
from .shapes import FieldSpec, extract
from .sources import InputFile, expand_inputs, iter_records
from .tokenization import ByteTokenizer
from .writer import Writer, check_ids

__all__ = ["build", "BuildReport", "rejects_path"]


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

    def summary(self) -> str:
        """A short multi-line human summary."""
        s = max(self.seconds, 1e-9)
        lines = [
            f"wrote {self.output}: {self.pairs:,} pairs in {self.shards} shard(s), {self.token_dtype}",
            f"  unique prompts   {self.unique_prompts:,}",
            f"  tokens stored    {self.tokens:,} ({self.prompt_tokens_saved:,} prompt tokens saved by de-duplication)",
            f"  dataset size     {self.dataset_bytes / 1e6:,.2f} MB",
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


class _Encoder:
    """Turns segments (text or ids) into checked int64 id arrays; decides the input mode."""

    def __init__(self, tokenizer: Any, vocab_size: int | None, add_bos: bool | None, add_eos: bool | None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.mode: str | None = None  # "text" or "ids", fixed by the first valid record

    def limit(self) -> int | None:
        if self.vocab_size is not None:
            return self.vocab_size
        if self.mode == "text" or self.tokenizer is not None:
            return self._tok().vocab_size
        return None

    def _tok(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = ByteTokenizer()
        return self.tokenizer

    def encode(self, segs: tuple[Any, Any, Any], spec: FieldSpec) -> tuple[np.ndarray, ...]:
        kinds = {"text" if isinstance(s, str) else "ids" for s in segs}
        if len(kinds) != 1:
            raise SourceError("mixes text and token ids between prompt/chosen/rejected", reason="mixed_types")
        kind = kinds.pop()
        if self.mode is None:
            self.mode = kind
        elif kind != self.mode:
            raise SourceError(f"record has {kind} but earlier records have {self.mode}", reason="mixed_types")
        names = (spec.prompt, spec.chosen, spec.rejected)
        limit = self.limit()
        if kind == "text":
            tok = self._tok()
            ids = []
            for s, name in zip(segs, names):
                if not s:
                    raise SourceError("segment is empty", field=name, reason="empty")
                try:
                    ids.append(np.asarray(tok.encode(s), dtype=np.int64))
                except PairpackError as e:
                    raise SourceError(str(e), field=name, reason="bad_text") from None
            out = [check_ids(a, n, limit) for a, n in zip(ids, names)]
        else:
            out = [check_ids(s, n, limit) for s, n in zip(segs, names)]
        bos, eos = self._specials()
        p, c, r = out
        if self.add_bos_now(kind) and bos is not None and p[0] != bos:
            p = np.concatenate([[bos], p])
        if self.add_eos_now(kind) and eos is not None:
            c = c if c[-1] == eos else np.concatenate([c, [eos]])
            r = r if r[-1] == eos else np.concatenate([r, [eos]])
        return p, c, r

    def _specials(self) -> tuple[int | None, int | None]:
        if self.tokenizer is None and self.mode == "ids":
            return None, None
        t = self._tok()
        return t.bos_id, t.eos_id

    def add_bos_now(self, kind: str) -> bool:
        return bool(self.add_bos)

    def add_eos_now(self, kind: str) -> bool:
        # default: EOS closes completions of text inputs; ids are taken verbatim
        return self.add_eos if self.add_eos is not None else kind == "text"


def build(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output: str | os.PathLike,
    *,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    tokenizer: Any = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
    force: bool = False,
    skip_invalid: bool = False,
    drop_identical: bool = False,
    shard_bytes: int = 1 << 30,
    dedup_window: int = 1 << 16,
    progress: bool | None = None,
    on_record: Callable[[int], None] | None = None,
) -> BuildReport:
    """Build a dataset at ``output`` from JSONL/JSON inputs.

    Args:
        inputs: files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.json`` arrays) or directories.
        output: the dataset directory to create (atomically).
        prompt, chosen, rejected: field names, dotted paths allowed.
        tokenizer: encodes text segments; default :class:`~pairpack.tokenization.ByteTokenizer`.
            Records with token-id lists are stored verbatim (checked against ``vocab_size``).
        vocab_size: for id inputs, the vocabulary size (else the largest id + 1 is recorded).
        pad_id: overrides the tokenizer's pad id (id inputs default to 0).
        add_bos: prepend BOS to prompts (never doubled). add_eos: append EOS to completions
            (never doubled); default True for text inputs, False for ids.
        force: replace an existing dataset. skip_invalid: write bad records to
            ``<output>.rejects.jsonl`` and go on instead of stopping at the first.
        drop_identical: drop pairs whose chosen and rejected ids are equal (always counted).
        progress: show a progress line (None: when stderr is a terminal).

    Returns:
        A :class:`BuildReport`. Raises SourceError (file, line, field) on the first bad record
        unless ``skip_invalid``; nothing is left at ``output`` then.
    """
    t0 = time.perf_counter()
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not force:
        raise DatasetExistsError(f"{out}: already exists; pass --force to replace it")
    spec = FieldSpec(prompt, chosen, rejected)
    files = [InputFile(p) for p in expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    enc = _Encoder(tokenizer, vocab_size, add_bos, add_eos)
    report = BuildReport(output=str(out))
    report.input_bytes = sum(f.size for f in files)
    bar = Progress(report.input_bytes, enabled=progress)
    writer: Writer | None = None
    rej_path = rejects_path(out)
    rej_tmp = rej_path.with_name(f".{rej_path.name}.tmp-{os.getpid()}")
    rej_file = None
    done_bytes = 0
    options = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "add_bos": add_bos,
               "add_eos": add_eos, "skip_invalid": skip_invalid, "drop_identical": drop_identical,
               "vocab_size": vocab_size, "pad_id": pad_id, "shard_bytes": shard_bytes,
               "dedup_window": dedup_window}

    def make_writer() -> Writer:
        tok = enc.tokenizer if (enc.mode == "text" or tokenizer is not None) else None
        if enc.mode == "text" or tok is not None:
            t = enc._tok()
            vs = vocab_size if vocab_size is not None else t.vocab_size
            pad = pad_id if pad_id is not None else t.pad_id
            bos, eos, ident = t.bos_id, t.eos_id, t.identity()
        else:
            vs, pad, bos, eos, ident = vocab_size, (pad_id if pad_id is not None else 0), None, None, None
        return Writer(out, vocab_size=vs, pad_id=pad, bos_id=bos, eos_id=eos, tokenizer=ident, force=force,
                      shard_bytes=shard_bytes, dedup_window=dedup_window)

    def reject(err: SourceError, raw: bytes) -> None:
        nonlocal rej_file
        if not skip_invalid:
            raise err
        report.rejected[err.reason] += 1
        if rej_file is None:
            rej_file = open(rej_tmp, "w", encoding="utf-8")
        rej_file.write(json.dumps({"file": err.path, "line": err.line, "field": err.field,
                                   "reason": err.reason, "message": err.detail,
                                   "record": raw.decode("utf-8", errors="replace")}, ensure_ascii=False) + "\n")

    try:
        for f in files:
            for rec in iter_records(f):
                if rec.error is not None:
                    reject(rec.error, rec.raw)
                    continue
                try:
                    p, c, r = enc.encode(extract(rec.data, spec), spec)
                except SourceError as e:
                    reject(SourceError(e.detail, path=rec.path, line=rec.line, field=e.field, reason=e.reason), rec.raw)
                    continue
                if len(c) == len(r) and np.array_equal(c, r):
                    report.identical += 1
                    if drop_identical:
                        report.identical_dropped += 1
                        continue
                if writer is None:
                    writer = make_writer()
                writer.add_checked(p, c, r)
                report.tokens += len(p) + len(c) + len(r)
                if on_record is not None:
                    on_record(writer.num_pairs)
                bar.update(writer.num_pairs, done_bytes + f.bytes_read)
            done_bytes += f.size
        if writer is None:
            writer = make_writer()
        manifest_prov = {
            "pairpack_version": __version__,
            "inputs": [f.provenance() for f in files],
            "options": options,
            "mode": enc.mode,
        }
        writer.provenance = manifest_prov
        if rej_file is not None:
            rej_file.close()
        manifest = writer.commit()
        if rej_file is not None:
            os.replace(rej_tmp, rej_path)
            report.rejects_file = str(rej_path)
        else:
            rej_path.unlink(missing_ok=True)  # a stale file from an earlier build would mislead
    except BaseException:
        bar.close()
        if writer is not None:
            writer.abort()
        if rej_file is not None:
            rej_file.close()
        rej_tmp.unlink(missing_ok=True)
        raise
    bar.close()
    report.pairs = manifest.num_pairs
    report.unique_prompts = sum(s.num_prompts for s in manifest.shards)
    stored = sum(s.num_tokens for s in manifest.shards)
    report.prompt_tokens_saved = report.tokens - stored
    report.tokens = stored
    report.token_dtype = manifest.token_dtype
    report.shards = len(manifest.shards)
    report.dataset_bytes = sum(e.bytes for s in manifest.shards for e in s.files.values()) + len(manifest.dumps())
    report.seconds = time.perf_counter() - t0
    return report
