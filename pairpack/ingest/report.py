"""What a build did: :class:`BuildReport` (the summary ``pairpack build`` prints and its ``--json``
report) and :func:`finish_report`, which reads the final figures from the written manifest."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import format as fmt
from ..progress import dataset_bytes, size_text
from .shapes import CHAT_SPLIT_NOTE

__all__ = ["BuildReport", "finish_report"]


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
    boundary: str = ""  # text pairs: the boundary convention ("prompt" or "row"; pairpack.ingest.joins)
    boundary_pairs: int = 0  # pairs whose rows, tokenized whole, merge tokens across the prompt's end
    boundary_example: dict | None = None  # the first such pair: file, line, row, text and ids at the join

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
        if self.boundary:
            lines.append(f"  boundaries       {self._boundary_text()}")
        if self.notes.get(CHAT_SPLIT_NOTE):
            lines.append(f"  chat splits      {self.notes[CHAT_SPLIT_NOTE]:,} record(s) whose template renders the prompt "
                         "differently once a reply follows: split at the common prefix (--strict-chat-template refuses them)")
        lines.append(f"  time             {self.seconds:,.2f} s: {self.pairs / s:,.0f} pairs/s, "
                     f"{self.input_bytes / s / 1e6:,.1f} MB/s of input")
        if self.rejects_file:
            lines.append(f"  rejects written to {self.rejects_file}")
        return "\n".join(lines)

    def _boundary_text(self) -> str:
        """The summary's line on boundary pairs (see :mod:`pairpack.ingest.joins`)."""
        n = self.boundary_pairs
        head = f"{n:,} pair(s) whose rows, tokenized whole, merge tokens across the end of the prompt"
        if not n:
            return f"0 pairs merge tokens across the end of the prompt: every row equals its whole tokenization " \
                   f"(--boundary {self.boundary})"
        if self.boundary == "row":
            how = "stored as tokenized whole, the prompt cut to the common prefix (--boundary row; " \
                  "--boundary prompt keeps the prompt as tokenized alone)"
        else:
            how = "the prompt kept as tokenized alone, so these rows differ from their whole tokenization " \
                  "(--boundary prompt; --boundary row stores rows as tokenized whole, as TRL does)"
        ex = self.boundary_example
        eg = (f"; e.g. {ex['file']}:{ex['line']} {ex['row']}: {ex['prompt_end'][-20:]!r} + "
              f"{ex['completion_start'][:20]!r}") if ex else ""
        return f"{head}: {how}{eg}"

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        d["notes"] = dict(self.notes)
        return d


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
