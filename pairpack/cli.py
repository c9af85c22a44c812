"""The ``pairpack`` command line: a thin click shell over the Python API.

Library errors (bad input, damaged datasets) print one line on stderr and exit 1; usage errors
exit 2; ``--debug`` shows the traceback instead. A closed stdout (``| head``) ends quietly with 141.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import FORMAT_VERSION, backend
from ._version import __version__
from .errors import ArgumentError, PairpackError, import_optional
from .progress import dataset_bytes, size_text
from .tables import text_table

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat big | head`
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _closed_stdout() -> None:
    """The reader closed stdout (`pairpack info D | head`): end quietly with the status of a process
    stopped by SIGPIPE (128 + 13), as cat and git do. Cleanup already ran on the way out; stdout
    now points at /dev/null so the final flush cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


class _Group(click.Group):
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:  # `pairpack --help | head` writes here, before invoke
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _closed_stdout()
            raise  # unreachable: for the type checker

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if ctx.params.get("debug"):
                raise
            _closed_stdout()
        except (PairpackError, OSError) as e:
            if ctx.params.get("debug"):
                raise
            msg = str(e) if isinstance(e, PairpackError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            click.echo(f"pairpack: error: {msg}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="pairpack",
                      message=f"%(prog)s %(version)s (format v{FORMAT_VERSION}, {backend()} kernels)")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """pairpack: preference pairs for DPO in a memory-mapped, checksummed format.

    \b
    Build a dataset, look at it, check it:
      pairpack build pairs.jsonl.zst -o data/pairs
      pairpack info data/pairs
      pairpack show data/pairs 0
      pairpack verify data/pairs

    The format is specified in spec/FORMAT.md.
    """


@main.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Dataset directory to create (written atomically).")
@click.option("--prompt", default=None, metavar="FIELD",
              help="Prompt field (dotted path allowed) [default: prompt; ShareGPT conversations and OpenAI "
                   "input.messages are recognised].")
@click.option("--chosen", default=None, metavar="FIELD", help="Chosen-completion field [default: chosen].")
@click.option("--rejected", default=None, metavar="FIELD", help="Rejected-completion field [default: rejected].")
@click.option("--vocab-size", type=click.IntRange(1, 2**32), default=None,
              help="For token-id inputs: ids must be below it; picks uint16 (<= 65536) or uint32.")
@click.option("--pad-id", type=click.IntRange(0), default=None, help="Pad id recorded in the manifest.")
@click.option("--add-bos/--no-add-bos", default=None, help="Prepend BOS to prompts (never doubled).")
@click.option("--add-eos/--no-add-eos", default=None,
              help="Append EOS to completions (never doubled). Default: on for text, except chat records (the "
                   "template's end of turn closes them, as in TRL), off for ids.")
@click.option("--boundary", type=click.Choice(["prompt", "row"]), default=None,
              help="Text pairs whose rows, tokenized whole, merge tokens across the end of the prompt: prompt "
                   "(keep the prompt as tokenized alone, as a generation sees it) or row (store rows exactly as "
                   "tokenized whole, the prompt cut to the common prefix, as TRL does). Default: row for chat "
                   "records, prompt otherwise; the summary counts such pairs. E.g. --boundary row.")
@click.option("-f", "--force", is_flag=True,
              help="Replace a pairpack dataset at OUTPUT (anything else there is refused, never deleted).")
@click.option("--skip-invalid", is_flag=True,
              help="Go on past bad records; write them with reasons to OUTPUT.rejects.jsonl.")
@click.option("--drop-identical", is_flag=True, help="Drop pairs whose chosen equals rejected.")
@click.option("--shard-size", default=None, help="Token bytes per shard (e.g. 256MiB). Default: 1GiB.")
@click.option("--tokenizer", "tokenizer", default=None, metavar="DIR|FILE",
              help="A model directory (tokenizer.json + tokenizer_config.json: chat template, BOS/EOS, add_bos) "
                   "or a Hugging Face tokenizer.json; needs the hf extra: pip install \"pairpack[hf]\". Hub names "
                   "are not fetched. Default: the built-in byte-level tokenizer. tokenizer.json is copied into "
                   "the dataset.")
@click.option("--bos-token", default=None, metavar="TOKEN", help="With --tokenizer: the BOS token (default: guessed).")
@click.option("--eos-token", default=None, metavar="TOKEN",
              help="With --tokenizer: the EOS token (default: tokenizer_config.json beside it, else e.g. <|endoftext|>, </s>).")
@click.option("--pad-token", default=None, metavar="TOKEN", help="With --tokenizer: the pad token (default: EOS).")
@click.option("--shape", type=click.Choice(["fields", "hh", "chat", "template"]), default=None,
              help="Record shape (default: detected from the first records).")
@click.option("--prompt-template", default=None, metavar="TEXT",
              help="Composite prompt over fields, e.g. '{instruction}[[\\n\\n{input}]]'; [[...]] is dropped "
                   "when a field in it is empty; \\n and \\t are unescaped; 'alpaca' = the built-in Alpaca prompt.")
@click.option("--chat-template", default=None, metavar="NAME|FILE",
              help="For message lists: tokenizer (the model's own), a named template (chatml, llama3, llama2, "
                   "mistral, phi3, gemma, zephyr, hh), a Jinja template file or a tokenizer_config.json. Default: "
                   "the tokenizer's own template, else chatml where its markers are tokens (or with the byte "
                   "tokenizer). E.g. --tokenizer phi3/tokenizer.json --chat-template phi3.")
@click.option("--markers-as-text", is_flag=True,
              help="Build with a named template whose markers are not tokens of the tokenizer (encoded as plain "
                   "text; the summary warns). Without it such a template is refused. E.g. --chat-template llama3 "
                   "--markers-as-text.")
@click.option("--strict-chat-template", is_flag=True,
              help="Refuse records whose template renders the prompt differently once a reply follows "
                   "(default: split them at the common prefix, as TRL does, and count them).")
@click.option("--template-arg", "template_args", multiple=True, metavar="KEY=JSON",
              help="A variable for Jinja chat templates, e.g. enable_thinking=false (repeatable; the value is "
                   "JSON, else a string). A record's chat_template_kwargs take precedence; its tools are passed too.")
@click.option("--columns", "columns", multiple=True, metavar="FIELD|NAME=FIELD[:DTYPE]",
              help="Keep numeric record fields as per-pair columns, e.g. --columns score_chosen,score_rejected "
                   "(float32 unless :DTYPE; repeatable or comma-separated).")
@click.option("--allow-empty", is_flag=True, help="Write the dataset even when no pair is kept (else exit 1).")
@click.option("--hh-marker", default="\\n\\nAssistant:", show_default=True,
              help="Assistant marker of HH transcripts (\\n unescaped).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Tokenizing processes (default: all cores; small inputs in-process). Output is identical for any N.")
@click.option("--num-shards", type=click.IntRange(1), default=1, show_default=True,
              help="Split the input into this many contiguous parts and build only one (see --shard-index).")
@click.option("--shard-index", type=click.IntRange(0), default=0, show_default=True,
              help="Which part to build, 0-based; combine the parts with `pairpack merge`.")
@click.option("--resume", is_flag=True,
              help="Keep OUTPUT if it was already built from the same inputs and options (re-run a split safely).")
@click.option("--max-record-bytes", default="64MiB", show_default=True, metavar="SIZE",
              help="Reject JSONL lines longer than this (reason too_long) without reading them into memory.")
@click.option("--pairs", "pair_rule", default=None, metavar="RULE",
              help="Multi-completion records (one prompt, N rated completions: UltraFeedback `completions` "
                   "objects or `responses` + `scores`): best-worst (one pair: highest vs lowest score), "
                   "best-rest (highest vs each other), or margin:X (every two whose scores differ by >= X). "
                   "Equal scores never pair (counted as ties); each distinct completion is stored once and "
                   "the pairs get score_chosen/score_rejected columns. Default when such records are "
                   "detected: best-worst.")
@click.option("--score-key", default=None, metavar="KEY",
              help="Score key inside completion objects (default: overall_score, score or rating).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(inputs: tuple[Path, ...], output: Path, prompt: str, chosen: str, rejected: str,
          vocab_size: int | None, pad_id: int | None, add_bos: bool | None, add_eos: bool | None,
          boundary: str | None, force: bool, skip_invalid: bool, drop_identical: bool, shard_size: str | None,
          tokenizer: str | None, bos_token: str | None, eos_token: str | None, pad_token: str | None,
          shape: str | None, prompt_template: str | None, chat_template: str | None, markers_as_text: bool,
          strict_chat_template: bool,
          template_args: tuple[str, ...], columns: tuple[str, ...], allow_empty: bool,
          hh_marker: str, workers: int | None, num_shards: int, shard_index: int, resume: bool,
          max_record_bytes: str, pair_rule: str | None, score_key: str | None, progress: bool | None,
          as_json: bool) -> None:
    """Convert preference records into a pairpack dataset.

    Inputs: .jsonl (.gz, .zst), .json arrays, .parquet, or directories of them. Shapes: prompt/
    chosen/rejected fields (strings or token-id lists), HH transcripts (chosen/rejected only),
    chat message lists (role/content or ShareGPT from/value), or a --prompt-template over fields
    (Alpaca records with an `instruction` field get the Alpaca template by default). Prompt and
    completions are tokenized separately and concatenated as ids, so the prompt is an exact prefix
    of both rows. Records with one prompt and several rated completions become pairs by --pairs.
    By default the first bad record stops the build with its file, line and field, and nothing is
    written.

    \b
    Examples:
      pairpack build train.jsonl -o data/train
      pairpack build hh.jsonl.gz -o data/hh --tokenizer gpt2.tokenizer.json
      pairpack build alpaca.json -o data/a --prompt-template alpaca
      pairpack build chats.parquet -o data/c --tokenizer models/Phi-3-mini/      # its own chat template
      pairpack build uf.jsonl -o data/uf --columns score_chosen,score_rejected
      pairpack build ids.jsonl.zst -o data/ids --vocab-size 151669 --pad-id 151643
      pairpack build big/ -o parts/p3 --num-shards 8 --shard-index 3 --resume
      pairpack build ultrafeedback.jsonl -o data/uf --pairs margin:1 --tokenizer gpt2.tokenizer.json
      pairpack build uf.jsonl -o data/uf --tokenizer qwen3.tokenizer.json --boundary row   # rows as TRL stores them
      pairpack build chats.jsonl -o data/c --tokenizer phi3/tokenizer.json --chat-template phi3
    """
    from .ingest.build import build as run_build

    if shard_index >= num_shards:
        raise click.BadParameter(f"must be < --num-shards ({num_shards})", param_hint="--shard-index")
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token))
               if v is not None}
    if special and tokenizer is None:
        raise click.UsageError("--bos-token/--eos-token/--pad-token need --tokenizer")
    try:
        if special:
            from .tokenization import load_tokenizer

            tokenizer = load_tokenizer(tokenizer, **special)
        report = run_build(list(inputs), output, prompt=prompt, chosen=chosen, rejected=rejected,
                           shape=shape, prompt_template=_unescape(prompt_template),
                           chat_template=chat_template, markers_as_text=markers_as_text,
                           strict_chat_template=strict_chat_template,
                           template_args=_template_args(template_args),
                           columns=[c.strip() for v in columns for c in v.split(",") if c.strip()],
                           allow_empty=allow_empty, hh_marker=_unescape(hh_marker) or "",
                           tokenizer=tokenizer, vocab_size=vocab_size, pad_id=pad_id, add_bos=add_bos,
                           add_eos=add_eos, boundary=boundary, force=force, skip_invalid=skip_invalid,
                           drop_identical=drop_identical,
                           shard_bytes=None if shard_size is None else _parse_size(shard_size),
                           workers=workers, num_shards=num_shards, shard_index=shard_index, resume=resume,
                           progress=progress, pairs=pair_rule, score_key=score_key,
                           max_record_bytes=_parse_size(max_record_bytes, "--max-record-bytes"))
    except ValueError as e:
        if isinstance(e, PairpackError) and not isinstance(e, ArgumentError):
            raise
        raise click.UsageError(str(e)) from None
    except OSError as e:
        if e.filename is None and not isinstance(e, PairpackError):
            # a write error (disk full, file size limit) names no file: name the output, which
            # the build has already removed with everything else it wrote
            raise OSError(e.errno, e.strerror or str(e), str(output)) from None
        raise
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())


def _template_args(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=JSON`` pairs (a value that is not JSON is taken as a string)."""
    out: dict[str, Any] = {}
    for it in items:
        key, sep, value = it.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{it!r} is not KEY=VALUE", param_hint="--template-arg")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _unescape(text: str | None) -> str | None:
    """Backslash escapes typed on a command line (\\n, \\t, \\\\) as the characters they name."""
    if text is None:
        return None
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


@main.command(context_settings=CONTEXT)
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Dataset directory to create.")
@click.option("--move", "how", flag_value="move", help="Rename the parts' files instead of hard-linking (consumes the parts).")
@click.option("--copy", "how", flag_value="copy", help="Copy the files instead of hard-linking.")
@click.option("--allow-partial", is_flag=True, help="Merge parts of a split even if some indices are missing.")
@click.option("--drop-splits", is_flag=True,
              help="Merge parts that record train/eval splits without them (refused otherwise; split again after).")
@click.option("-f", "--force", is_flag=True,
              help="Replace a pairpack dataset at OUTPUT (anything else there is refused, never deleted).")
def merge(parts: tuple[Path, ...], output: Path, how: str | None, allow_partial: bool, force: bool,
          drop_splits: bool) -> None:
    """Combine datasets (e.g. the parts of a --num-shards build) into one, without copying tokens.

    Shard files are hard-linked (default) into renumbered shard directories and their checksums
    reused; parts must share tokenizer, special ids, token dtype, columns and record options.
    Parts of one split are put in --shard-index order, so the result has the input order.

    \b
    Example:
      for i in 0 1 2 3; do pairpack build data/ -o parts/p$i --num-shards 4 --shard-index $i; done
      pairpack merge parts/p* -o data/all
    """
    from .ops.merge import merge as run_merge

    report = run_merge(list(parts), output, force=force, how=how or "link", allow_partial=allow_partial,
                       drop_splits=drop_splits)
    click.echo(report.summary())


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="out.jsonl, out.jsonl.gz or out.jsonl.zst")
@click.option("--decode", is_flag=True, help="Also write prompt_text/chosen_text/rejected_text.")
@click.option("-f", "--force", is_flag=True,
              help="Replace an OUTPUT that pairpack wrote (any other file is refused, never deleted).")
def export(dataset: Path, output: Path, decode: bool, force: bool) -> None:
    """Write a dataset's pairs as JSON lines of token ids (and decoded text with --decode).

    A sidecar OUTPUT.pairpack.json keeps the dataset settings, so `pairpack build OUTPUT` gives
    back the same dataset (same pairs, fingerprint, vocabulary and special ids).

    \b
    Example:
      pairpack export data/train -o train.jsonl.zst --decode
      pairpack build train.jsonl.zst -o data/train2
    """
    from .ops.export import export as run_export

    n = run_export(dataset, output, decode=decode, force=force)
    click.echo(f"exported {n:,} pairs to {output} (settings in {output}.pairpack.json)")


def _parse_size(text: str, hint: str = "--shard-size") -> int:
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 2GB", param_hint=hint) from None
    if value < 1:
        raise click.BadParameter("must be positive", param_hint=hint)
    return int(value)


_SUMMARY_KEYS = ("min", "p50", "p90", "p99", "max", "mean")


def _length_summary(x: np.ndarray) -> dict[str, float | None]:
    """min, p50/p90/p99 (:func:`pairpack.ops.stats.percentiles`, as ``stats`` reports them), max and
    mean of ``x`` (None for an empty array)."""
    from .ops.stats import PERCENTILES, percentiles

    if x.size == 0:
        return dict.fromkeys(_SUMMARY_KEYS)
    q = [float(v) for v in percentiles(x, PERCENTILES)]
    return dict(zip(_SUMMARY_KEYS, [float(x.min()), *q, float(x.max()), float(x.mean())]))


def _summary_cells(d: dict[str, float | None]) -> list[str]:
    fmts = {"mean": "{:,.1f}"}
    return ["-" if d[k] is None else fmts.get(k, "{:,.0f}").format(d[k]) for k in _SUMMARY_KEYS]


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(dataset: Path, as_json: bool) -> None:
    """Counts, dtype, sizes and length percentiles of a dataset.

    \b
    Example:
      pairpack info data/train
    """
    from .read.dataset import open_dataset

    ds = open_dataset(dataset)
    m = ds.manifest
    ln = ds.lengths
    sizes = dataset_bytes(m)
    tokens = sum(s.num_tokens for s in m.shards)
    prompts = sum(s.num_prompts for s in m.shards)
    rows = {"prompt": ln[0], "chosen": ln[1], "rejected": ln[2],
            "preferred row": ln[0] + ln[1], "unpreferred row": ln[0] + ln[2]}
    if as_json:
        out = {"path": str(dataset), "pairs": len(ds), "shards": len(m.shards), "token_dtype": m.token_dtype,
               "vocab_size": m.vocab_size, "pad_id": m.pad_id, "bos_id": m.bos_id, "eos_id": m.eos_id,
               "tokenizer": m.tokenizer, "unique_prompts": prompts, "tokens": tokens, "bytes": sizes,
               "columns": [c.name for c in m.columns], "fingerprint": ds.fingerprint,
               "splits": {s.name: {"pairs": s.num_pairs, "prompts": s.num_prompts, "by": s.by, "seed": s.seed}
                          for s in m.splits},
               "lengths": {k: _length_summary(x) for k, x in rows.items()}}
        click.echo(json.dumps(out, indent=1))
        return
    tok = m.tokenizer or {}
    click.echo(f"dataset      {dataset}")
    click.echo(f"pairs        {len(ds):,} in {len(m.shards)} shard(s); {prompts:,} unique prompts")
    click.echo(f"tokens       {tokens:,} stored as {m.token_dtype} (vocab_size {m.vocab_size:,}, pad_id {m.pad_id}"
               f", bos_id {m.bos_id}, eos_id {m.eos_id})")
    click.echo(f"tokenizer    {tok.get('kind', 'unknown')} {tok.get('name', '')}".rstrip())
    click.echo(f"size         {size_text(sizes)}" + (f" (of which tokenizer copy {size_text(tok['file']['bytes'])})"
                                                        if isinstance(tok.get("file"), dict) else ""))
    if m.columns:
        click.echo(f"columns      {', '.join(c.name + ':' + c.dtype for c in m.columns)}")
    if m.splits:
        click.echo("splits       " + "; ".join(f"{s.name} {s.num_pairs:,} pairs, {s.num_prompts:,} prompts (by {s.by}, "
                                               f"seed {s.seed})" for s in m.splits))
    click.echo(f"fingerprint  {ds.fingerprint}")
    click.echo("")
    header = ["length (tokens)", "min", "p50", "p90", "p99", "max", "mean"]
    for line in text_table([header] + [[k] + _summary_cells(_length_summary(x)) for k, x in rows.items()]):
        click.echo(line)


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})  # so INDEX may be -1
@click.argument("dataset", type=click.Path(path_type=Path))
@click.argument("index", type=int)
@click.option("--ids", "show_ids", is_flag=True, help="Show raw token ids instead of text.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--color/--no-color", default=None,
              help="Prompt dim, chosen green, rejected red (default: on a terminal, unless NO_COLOR is set).")
def show(dataset: Path, index: int, show_ids: bool, as_json: bool, color: bool | None = None) -> None:
    """Print one pair: prompt, chosen and rejected with token counts (decoded when the tokenizer is known).

    INDEX may be negative (-1 is the last pair).

    \b
    Examples:
      pairpack show data/train 0
      pairpack show data/train -1 --ids
      pairpack show data/train 7 --json | jq .chosen.length
    """
    from .ops.show import pair_to_json, render_pair, tokenizer_status, use_color
    from .read.dataset import open_dataset

    ds = open_dataset(dataset)
    try:
        if as_json:
            click.echo(json.dumps(pair_to_json(ds, index), ensure_ascii=False))  # one line: ids stay compact
            return
        on = use_color(color)
        click.echo(render_pair(ds, index, show_ids=show_ids, color=on), color=on)
    except IndexError as e:
        raise click.BadParameter(str(e), param_hint="INDEX") from None
    why = None if show_ids else tokenizer_status(ds)
    if why is not None:
        click.echo(f"({why}: showing ids)", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--no-checksums", is_flag=True, help="Skip hashing; check structure and invariants only.")
def verify(dataset: Path, no_checksums: bool) -> None:
    """Check every checksum and invariant. Exit 0 when sound, 1 with a report when not.

    \b
    Example:
      pairpack verify data/train && echo ok
    """
    import time

    from .format import read_manifest
    from .progress import Progress
    from .read.verify import verify_dataset

    t0 = time.perf_counter()
    try:
        total = sum(e.bytes for s in read_manifest(dataset).shards
                    for e in list(s.files.values()) + list(s.columns.values()))
    except PairpackError:
        total = None  # verify_dataset reports the manifest's problem
    bar = Progress(total, label="files")
    done = [0, 0]

    def on_file(nbytes: int) -> None:
        done[0] += 1
        done[1] += nbytes
        bar.update(done[0], done[1])

    # verify_dataset never raises for a damaged dataset: it lists every problem it can find
    problems = verify_dataset(dataset, checksums=not no_checksums, on_file=on_file)
    bar.close()
    dt = time.perf_counter() - t0
    if problems:
        click.echo(f"{dataset}: {len(problems)} problem(s):", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(1)
    m = read_manifest(dataset)
    nbytes = dataset_bytes(m)
    click.echo(f"{dataset}: OK ({m.num_pairs:,} pairs, {size_text(nbytes)} checked in {dt:.2f} s, "
               f"{nbytes / 1e6 / max(dt, 1e-9):,.0f} MB/s)")


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.argument("more_lengths", nargs=-1, type=click.IntRange(2), metavar="[N]...")
@click.option("--max-length", "max_lengths", type=click.IntRange(2), multiple=True, metavar="N",
              help="Candidate max_length: --max-length 512 1024 or --max-length 512 --max-length 1024. "
                   "Default: powers of two around the data + a suggestion.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Pairs per batch for the padding numbers [default: 32].")
@click.option("--max-tokens", type=click.IntRange(4), default=None,
              help="Token budget per batch (2 x B x L) instead of --batch-size.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Loader seed (epoch 0 order).")
@click.option("--min-completion-tokens", type=click.IntRange(1), default=1, show_default=True,
              help="The loader's floor when truncation cuts completions.")
@click.option("--max-row-tokens", type=click.IntRange(0), default=None,
              help="Row bound of the packed layouts in the layout table (0: one pair per row; default: the budget).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG: length histograms, truncation curve, chosen-minus-rejected.")
@click.option("--with", "others", multiple=True, type=click.Path(path_type=Path), metavar="DATASET",
              help="Statistics of the mixture of DATASET and this dataset (repeatable): every pair of each source "
                   "once, as a Loader mixture at its default weights; the sources must share a tokenizer.")
def stats(dataset: Path, more_lengths: tuple[int, ...], max_lengths: tuple[int, ...], batch_size: int | None,
          max_tokens: int | None, seed: int, min_completion_tokens: int, max_row_tokens: int | None, as_json: bool,
          plot: Path | None, others: tuple[Path, ...] = ()) -> None:
    """Length percentiles, truncation, padding efficiency, tokens per pair per layout, length bias, prompt sharing.

    Truncation follows the loader's rule (completions cut first, down to --min-completion-tokens,
    then the prompt); padding efficiency comes from the loader's own batch planner, random versus
    length-grouped, so these are the numbers training will see. The layout table gives the tokens the
    model processes per pair with padded, packed and prefix-shared batches under the same budget.

    \b
    Examples:
      pairpack stats data/train
      pairpack stats data/train --max-length 1024 2048 --batch-size 16
      pairpack stats data/train --max-tokens 65536 --plot lengths.png
      pairpack stats data/train --json | jq .suggested_max_length
      pairpack stats data/hh --with data/uf --with data/tulu    # a mixture, every pair once
    """
    from .batch.plan import check_options
    from .ops.stats import compute_stats, plot_stats
    from .read.dataset import open_dataset

    if batch_size is not None and max_tokens is not None:
        raise click.UsageError("give --batch-size or --max-tokens, not both")
    if more_lengths and not max_lengths:
        raise click.UsageError(f"unexpected argument {more_lengths[0]}: candidate lengths follow --max-length "
                               f"(pairpack stats DATASET --max-length {' '.join(map(str, more_lengths))})")
    max_lengths = tuple(dict.fromkeys(max_lengths + more_lengths))
    try:  # the loader's own option checks, so a bad combination is a usage error here, not a traceback
        for n in max_lengths or (None,):
            for layout in ("padded", "packed", "prefix_shared"):
                check_options(batch_size=batch_size if max_tokens else (batch_size or 32), max_tokens=max_tokens,
                              max_length=n, min_completion_tokens=min_completion_tokens, layout=layout,
                              max_row_tokens=None if layout == "padded" else max_row_tokens)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if plot is not None:  # fail before the statistics are computed
        import_optional("matplotlib", feature="--plot", extra="plot")
    if others:
        from .batch.mixture import Mixture

        paths = (dataset, *others)
        names = [p.name or str(p) for p in paths]
        if len(set(names)) != len(names):
            names = [str(p) for p in paths]
        ds = Mixture(dict(zip(names, paths))).view
    else:
        ds = open_dataset(dataset)
    result = compute_stats(ds, max_lengths=list(max_lengths) or None, batch_size=batch_size,
                           max_tokens=max_tokens, seed=seed, min_completion_tokens=min_completion_tokens,
                           max_row_tokens=max_row_tokens)
    if plot is not None and len(ds):
        plot_stats(result, plot)
    if as_json:
        out = result.to_json()
        if plot is not None:
            out["plot"] = str(plot)
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(result.render())
    if plot is not None:
        click.echo(f"\nplot written to {plot}" if len(ds) else "\n(empty dataset: no plot written)")


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Archive file to create, e.g. train.pairpack.zst (written atomically).")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstandard level.")
@click.option("--threads", type=int, default=-1, show_default=True, help="Compression threads (-1: all cores).")
@click.option("-f", "--force", is_flag=True,
              help="Replace an OUTPUT that pairpack wrote (any other file is refused, never deleted).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def pack(dataset: Path, output: Path, level: int, threads: int, force: bool, as_json: bool) -> None:
    """Pack a dataset into one zstandard-compressed, checksummed, streamable archive.

    Every file is checked against its manifest checksum while it is packed; the archive lists
    every member's size and xxh3-128 (the manifest's included) so unpack can verify them all.

    \b
    Examples:
      pairpack pack data/train -o train.pairpack.zst
      pairpack pack data/train -o train.pairpack.zst --level 19
    """
    from .ops.archive import pack as run_pack

    report = run_pack(dataset, output, level=level, threads=threads, force=force)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())


@main.command(context_settings=CONTEXT)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Dataset directory to create (written atomically).")
@click.option("-f", "--force", is_flag=True,
              help="Replace a pairpack dataset at OUTPUT (anything else there is refused, never deleted).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def unpack(archive: Path, output: Path, force: bool, as_json: bool) -> None:
    """Unpack an archive made by `pairpack pack`, verifying every member; nothing is left on failure.

    \b
    Example:
      pairpack unpack train.pairpack.zst -o data/train
    """
    from .ops.archive import unpack as run_unpack

    report = run_unpack(archive, output, force=force)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())


def sample_path() -> Path:
    """The bundled real sample (see pairpack/data/LICENSE-sample.md)."""
    return Path(__file__).parent / "data" / "instruction-data-with-preference.json"


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/demo"), show_default=True,
              help="Directory for the demo's dataset.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the loss / accuracy / margin curves to this PNG (needs matplotlib).")
@click.option("--steps", type=click.IntRange(0), default=None,
              help="DPO training steps (default 120; 0 only evaluates the initial model).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads for the DPO part (default 1: fastest on a busy 2-core machine).")
@click.option("--layout", type=click.Choice(["padded", "packed", "prefix_shared"]), default="padded",
              show_default=True, help="Batch layout of the DPO part (prefix_shared: each prompt runs once per pair).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def demo(out: Path, plot: Path | None = None, steps: int | None = None, threads: int | None = None,
         layout: str = "padded", progress: bool | None = None) -> None:
    """Build the bundled real sample, show it, then train a small model on it with DPO.

    The DPO part trains a 2-layer causal transformer (plain torch, byte vocabulary) on CPU
    with pure DPO for about a minute: the reference log-probs are cached in the dataset as
    columns, then a table of loss, reward accuracy and margin on training and held-out pairs
    is printed at a few checkpoints.

    \b
    Examples:
      pairpack demo --out /tmp/demo
      pairpack demo --plot dpo-curves.png
      pairpack demo --layout prefix_shared
    """
    from .ingest.build import build as run_build

    ds_path = out / "sample"
    click.echo(f"building {sample_path().name} -> {ds_path}")
    report = run_build([sample_path()], ds_path, prompt_template="alpaca", force=True)
    click.echo(report.summary() + "\n")
    ctx = click.get_current_context()
    ctx.invoke(info, dataset=ds_path, as_json=False)
    click.echo("")
    ctx.invoke(show, dataset=ds_path, index=0, show_ids=False, as_json=False)
    _demo_dpo(ds_path, plot=plot, steps=steps, threads=threads, layout=layout, progress=progress)


def _demo_dpo(ds_path: Path, *, plot: Path | None, steps: int | None, threads: int | None, layout: str,
              progress: bool | None) -> None:
    """The DPO part of ``pairpack demo`` (logic in pairpack.train.demo)."""
    import dataclasses
    import time

    from .train.demo import (
        DemoConfig,
        format_table,
        run_demo,
        save_plot,
    )

    if plot is not None:
        import_optional("matplotlib", feature="--plot", extra="plot")  # fail now, not after training
    cfg = dataclasses.replace(DemoConfig(), layout=layout, **({} if steps is None else {"steps": steps}),
                              **({} if threads is None else {"threads": threads}))
    click.echo(f"\nDPO demo: pure DPO (beta {cfg.beta}, reduction {cfg.reduction!r}, AdamW lr {cfg.lr}, "
               f"batch {cfg.batch_size} pairs, {cfg.layout} layout) for {cfg.steps} steps on CPU")
    t0 = time.perf_counter()
    result = run_demo(ds_path, cfg, progress=progress, log=click.echo)
    click.echo("")
    click.echo(format_table(result))
    click.echo(f"\nloss in nats (ln 2 = 0.6931 at step 0: policy = reference); acc = fraction of pairs whose "
               f"chosen reward beats the rejected one; margin = mean chosen - rejected reward.\n"
               f"train = the first {result.n_train_eval} of {result.n_train} training pairs; held-out = the "
               f"last {result.n_heldout} pairs, never trained on.")
    click.echo(f"DPO part: {time.perf_counter() - t0:.1f} s (reference cache {result.reference_seconds:.1f} s, "
               f"training and checkpoints {result.train_seconds:.1f} s)")
    if plot is not None:
        click.echo(f"curves saved to {save_plot(result, plot)}")


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--eval-fraction", type=click.FloatRange(0.0, 1.0), required=True,
              help="Fraction of pairs in the eval split (to within one prompt group with --by prompt).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the draw.")
@click.option("--by", type=click.Choice(["prompt", "pair"]), default="prompt", show_default=True,
              help="prompt: no prompt (by token ids) in both splits; pair: random pairs.")
@click.option("--names", default="train,eval", show_default=True, metavar="TRAIN,EVAL",
              help="The two split names.")
def split(dataset: Path, eval_fraction: float, seed: int, by: str, names: str) -> None:
    """Record train/eval splits in a dataset, no prompt in both (the pairs do not change).

    Every pair of a prompt (by token ids, so prompts written twice in the source are caught) goes
    to the same split. The splits are checksummed files beside the shards, added atomically;
    running split again replaces them. Read them with Loader(ds, split="train") or ds.split("eval").

    \b
    Examples:
      pairpack split data/train --eval-fraction 0.02 --seed 0
      pairpack split data/train --eval-fraction 0.1 --by pair
      pairpack info data/train        # lists the splits
    """
    from .ops.split import split as run_split

    parts = tuple(n.strip() for n in names.split(","))
    if len(parts) != 2:
        raise click.UsageError(f"--names takes two names separated by a comma, got {names!r}")
    click.echo(run_split(dataset, eval_fraction=eval_fraction, seed=seed, by=by, names=parts).summary())


@main.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(["auto", "ids", "text"]), default="auto", show_default=True,
              help="auto: token ids when both share a tokenizer, else normalised decoded text.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def overlap(a: Path, b: Path, by: str, as_json: bool) -> None:
    """How many of B's prompts (and pairs) occur in A: check an eval set against training data.

    \b
    Examples:
      pairpack overlap data/train data/eval
      pairpack overlap data/train bench/ --json
    """
    from .ops.overlap import overlap as run_overlap

    report = run_overlap(a, b, by=by)
    click.echo(json.dumps(report.as_dict(), indent=1) if as_json else report.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
