"""The ``pairpack`` command line: a thin click shell over the Python API.

Library errors (bad input, damaged datasets) print one line on stderr and exit 1; usage errors
exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from .errors import PairpackError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (PairpackError, OSError) as e:
            if ctx.params.get("debug"):
                raise
            msg = str(e) if isinstance(e, PairpackError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            click.echo(f"pairpack: error: {msg}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="pairpack")
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
@click.option("--prompt", default="prompt", show_default=True, help="Prompt field (dotted path allowed).")
@click.option("--chosen", default="chosen", show_default=True, help="Chosen-completion field.")
@click.option("--rejected", default="rejected", show_default=True, help="Rejected-completion field.")
@click.option("--vocab-size", type=click.IntRange(1, 2**32), default=None,
              help="For token-id inputs: ids must be below it; picks uint16 (<= 65536) or uint32.")
@click.option("--pad-id", type=click.IntRange(0), default=None, help="Pad id recorded in the manifest.")
@click.option("--add-bos/--no-add-bos", default=None, help="Prepend BOS to prompts (never doubled).")
@click.option("--add-eos/--no-add-eos", default=None,
              help="Append EOS to completions (never doubled). Default: on for text, off for ids.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing dataset at OUTPUT.")
@click.option("--skip-invalid", is_flag=True,
              help="Go on past bad records; write them with reasons to OUTPUT.rejects.jsonl.")
@click.option("--drop-identical", is_flag=True, help="Drop pairs whose chosen equals rejected.")
@click.option("--shard-size", default="1GiB", show_default=True, help="Token bytes per shard (e.g. 256MiB).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(inputs: tuple[Path, ...], output: Path, prompt: str, chosen: str, rejected: str,
          vocab_size: int | None, pad_id: int | None, add_bos: bool | None, add_eos: bool | None,
          force: bool, skip_invalid: bool, drop_identical: bool, shard_size: str,
          progress: bool | None, as_json: bool) -> None:
    """Convert JSONL / JSON preference records into a pairpack dataset.

    Each record has a prompt, a chosen and a rejected segment, as strings (tokenized with the
    built-in byte-level tokenizer) or as lists of token ids (stored as they are). Inputs may be
    .jsonl, .jsonl.gz, .jsonl.zst, .json arrays, or directories of them. By default the first bad
    record stops the build with its file, line and field, and nothing is written.

    \b
    Examples:
      pairpack build train.jsonl -o data/train
      pairpack build ids.jsonl.zst -o data/ids --vocab-size 151669 --pad-id 151643
      pairpack build raw/ -o data/x --chosen output.good --rejected output.bad --skip-invalid
    """
    from .build import build as run_build

    report = run_build(list(inputs), output, prompt=prompt, chosen=chosen, rejected=rejected,
                       vocab_size=vocab_size, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
                       force=force, skip_invalid=skip_invalid, drop_identical=drop_identical,
                       shard_bytes=_parse_size(shard_size), progress=progress)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())


def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 2GB", param_hint="--shard-size") from None
    if value < 1:
        raise click.BadParameter("must be positive", param_hint="--shard-size")
    return int(value)


def _percentiles(x: np.ndarray) -> list[str]:
    if x.size == 0:
        return ["-"] * 6
    q = np.percentile(x, [50, 90, 99]).tolist()
    return [f"{int(x.min()):,}", f"{q[0]:,.0f}", f"{q[1]:,.0f}", f"{q[2]:,.0f}", f"{int(x.max()):,}",
            f"{x.mean():,.1f}"]


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(dataset: Path, as_json: bool) -> None:
    """Counts, dtype, sizes and length percentiles of a dataset.

    \b
    Example:
      pairpack info data/train
    """
    from .reader import open_dataset

    ds = open_dataset(dataset)
    m = ds.manifest
    ln = ds.lengths
    sizes = sum(e.bytes for s in m.shards for e in list(s.files.values()) + list(s.columns.values()))
    tokens = sum(s.num_tokens for s in m.shards)
    prompts = sum(s.num_prompts for s in m.shards)
    rows = {"prompt": ln[0], "chosen": ln[1], "rejected": ln[2],
            "preferred row": ln[0] + ln[1], "unpreferred row": ln[0] + ln[2]}
    if as_json:
        out = {"path": str(dataset), "pairs": len(ds), "shards": len(m.shards), "token_dtype": m.token_dtype,
               "vocab_size": m.vocab_size, "pad_id": m.pad_id, "bos_id": m.bos_id, "eos_id": m.eos_id,
               "tokenizer": m.tokenizer, "unique_prompts": prompts, "tokens": tokens, "bytes": sizes,
               "columns": [c.name for c in m.columns], "fingerprint": ds.fingerprint,
               "lengths": {k: dict(zip(["min", "p50", "p90", "p99", "max", "mean"],
                                       [float(v.replace(",", "")) if v != "-" else None for v in _percentiles(x)]))
                           for k, x in rows.items()}}
        click.echo(json.dumps(out, indent=1))
        return
    tok = m.tokenizer or {}
    click.echo(f"dataset      {dataset}")
    click.echo(f"pairs        {len(ds):,} in {len(m.shards)} shard(s); {prompts:,} unique prompts")
    click.echo(f"tokens       {tokens:,} stored as {m.token_dtype} (vocab_size {m.vocab_size:,}, pad_id {m.pad_id}"
               f", bos_id {m.bos_id}, eos_id {m.eos_id})")
    click.echo(f"tokenizer    {tok.get('kind', 'unknown')} {tok.get('name', '')}".rstrip())
    click.echo(f"size         {sizes / 1e6:,.2f} MB")
    if m.columns:
        click.echo(f"columns      {', '.join(c.name + ':' + c.dtype for c in m.columns)}")
    click.echo(f"fingerprint  {ds.fingerprint}")
    click.echo("")
    header = ["length (tokens)", "min", "p50", "p90", "p99", "max", "mean"]
    table = [header] + [[k] + _percentiles(x) for k, x in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        click.echo("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.argument("index", type=int)
@click.option("--ids", "show_ids", is_flag=True, help="Show raw token ids instead of text.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(dataset: Path, index: int, show_ids: bool, as_json: bool) -> None:
    """Print one pair: prompt, chosen and rejected (decoded when the tokenizer is known).

    \b
    Examples:
      pairpack show data/train 0
      pairpack show data/train -1 --ids
    """
    from .reader import open_dataset

    ds = open_dataset(dataset)
    try:
        pair = ds[index]
    except IndexError as e:
        raise click.BadParameter(str(e), param_hint="INDEX") from None
    can_decode = ds.tokenizer is not None
    if as_json:
        out: dict[str, Any] = {"index": index}
        for name, seg in zip(("prompt", "chosen", "rejected"), pair):
            out[name] = {"ids": seg.tolist(), "length": int(seg.size)}
            if can_decode:
                out[name]["text"] = ds.decode(seg)
        click.echo(json.dumps(out, ensure_ascii=False, indent=1))
        return
    color = sys.stdout.isatty()
    styles = {"prompt": {"dim": True}, "chosen": {"fg": "green"}, "rejected": {"fg": "red"}}
    for name, seg in zip(("prompt", "chosen", "rejected"), pair):
        body = " ".join(map(str, seg.tolist())) if (show_ids or not can_decode) else ds.decode(seg)
        click.echo(click.style(f"── {name} ({seg.size:,} tokens)", bold=True) if color
                   else f"── {name} ({seg.size:,} tokens)")
        click.echo(click.style(body, **styles[name]) if color else body)
    if not can_decode and not show_ids:
        click.echo("(tokenizer unknown: showing ids)", err=True)


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

    from .reader import open_dataset

    t0 = time.perf_counter()
    try:
        ds = open_dataset(dataset)
        problems = ds.verify(checksums=not no_checksums)
    except PairpackError as e:
        problems = [str(e)]
        ds = None
    dt = time.perf_counter() - t0
    if problems:
        click.echo(f"{dataset}: {len(problems)} problem(s):", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(1)
    nbytes = sum(e.bytes for s in ds.manifest.shards for e in list(s.files.values()) + list(s.columns.values()))
    click.echo(f"{dataset}: OK ({len(ds):,} pairs, {nbytes / 1e6:,.1f} MB checked in {dt:.2f} s)")


def sample_path() -> Path:
    """The bundled real sample (see pairpack/data/LICENSE-sample.md)."""
    return Path(__file__).parent / "data" / "instruction-data-with-preference.json"


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/demo"), show_default=True,
              help="Directory for the demo's dataset.")
def demo(out: Path) -> None:
    """Build the bundled real sample into a dataset, then show info and a decoded pair.

    \b
    Example:
      pairpack demo --out /tmp/demo
    """
    from .build import build as run_build

    ds_path = out / "sample"
    click.echo(f"building {sample_path().name} -> {ds_path}")
    report = run_build([sample_path()], ds_path, prompt="instruction", force=True)
    click.echo(report.summary() + "\n")
    ctx = click.get_current_context()
    ctx.invoke(info, dataset=ds_path, as_json=False)
    click.echo("")
    ctx.invoke(show, dataset=ds_path, index=0, show_ids=False, as_json=False)


if __name__ == "__main__":  # pragma: no cover
    main()
