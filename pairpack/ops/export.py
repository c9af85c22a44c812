"""``pairpack export``: a dataset written back out as JSONL.

Export writes one JSON object per pair, ``{"prompt": [ids], "chosen": [ids], "rejected": [ids]}``
plus the per-pair columns and, with ``decode``, the decoded texts, and a sidecar
``<out>.pairpack.json`` holding the dataset settings; ``pairpack build`` of the export reads the
sidecar and gives back a dataset with the same pairs, fingerprint and settings."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import format as fmt
from .._version import __version__
from ..errors import FormatError, StateError
from ..format.fsio import check_output, clean_stale_temps, install_file, replace_file, temp_path_for
from ..format.sidecar import SIDECAR_FORMAT, SIDECAR_SUFFIX, read_sidecar
from ..read.dataset import open_dataset
from ..tokenization import decode_rows
from .show import tokenizer_status

__all__ = ["export"]

def _open_out(path: Path, name: str) -> Any:
    """A binary writer at ``path``, compressed as the final file ``name`` says (.zst, .gz)."""
    name = name.lower()
    if name.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "wb")
        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
    if name.endswith(".gz"):
        return gzip.open(path, "wb", compresslevel=6)
    return open(path, "wb", buffering=1 << 20)


def _not_an_export_because(path: Path) -> str | None:
    """Why ``export --force`` may not replace ``path`` (FORMAT.md §9 W8), or None: it must be a
    regular file with the sidecar an export writes beside it (``<path>.pairpack.json``)."""
    if path.is_symlink() or not path.is_file():
        return "is not a regular file"
    try:
        side = read_sidecar(path)
    except FormatError:
        side = None
    return None if side is not None else f"has no pairpack export sidecar ({path.name}{SIDECAR_SUFFIX}) beside it"


def export(dataset: str | os.PathLike, output: str | os.PathLike, *, decode: bool = False,
           force: bool = False) -> int:
    """Write every pair of ``dataset`` to ``output`` (``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``).

    Each line: ``{"prompt": [ids], "chosen": [ids], "rejected": [ids], <column>: value, ...}``,
    with ``prompt_text``/``chosen_text``/``rejected_text`` added when ``decode`` and the tokenizer
    is available (decoded as whole rows: ``prompt_text + chosen_text`` is the decoded
    prompt+chosen row). Beside it, ``<output>.pairpack.json`` records vocab_size, special ids,
    tokenizer identity, shard_bytes and dedup_window (and ``<output>.tokenizer.json``, a copy of
    the dataset's tokenizer file, when it has one), which ``pairpack build`` uses so that building
    the export gives back the same dataset. Returns the number of pairs written.
    """
    import orjson


    ds = open_dataset(dataset)
    out = Path(output)
    check_output(out, force=force, what="export", not_ours=_not_an_export_because)
    tok = ds.tokenizer if decode else None
    if decode and tok is None:
        raise StateError(f"{dataset}: cannot --decode: {tokenizer_status(ds)}")
    m = ds.manifest
    opt = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    side_path, tok_path = Path(str(out) + SIDECAR_SUFFIX), Path(str(out) + ".tokenizer.json")
    for p in (out, side_path, tok_path):
        clean_stale_temps(p)
    tmp = temp_path_for(out)
    n = 0
    try:
        with _open_out(tmp, out.name) as f:
            for sh in ds._live():
                toks, st, ln = sh.tokens, sh.starts, sh.lengths
                cols = {k: v for k, v in sh.columns.items()}
                step = 4096
                for a in range(0, sh.info.num_pairs, step):
                    s_chunk, l_chunk = st[:, a:a + step].tolist(), ln[:, a:a + step].tolist()
                    c_chunk = {k: v[a:a + step].tolist() for k, v in cols.items()}
                    lines = []
                    for j in range(len(s_chunk[0])):
                        rec: dict[str, Any] = {}
                        for row, key in enumerate(("prompt", "chosen", "rejected")):
                            s0 = s_chunk[row][j]
                            rec[key] = toks[s0:s0 + l_chunk[row][j]]
                        for k, v in c_chunk.items():
                            rec[k] = v[j]
                        if tok is not None:  # whole rows: no start-of-text marker inside a row
                            texts = decode_rows(tok, rec["prompt"], rec["chosen"], rec["rejected"])
                            for key, text in zip(("prompt", "chosen", "rejected"), texts):
                                rec[key + "_text"] = text
                        lines.append(orjson.dumps(rec, option=opt))
                    f.write(b"".join(lines))
                    n += len(lines)
        opts = m.provenance.get("options", {})
        side: dict[str, Any] = {
            "format": SIDECAR_FORMAT, "pairpack_version": __version__, "num_pairs": n,
            "fingerprint": m.fingerprint(), "vocab_size": m.vocab_size, "pad_id": m.pad_id, "bos_id": m.bos_id,
            "eos_id": m.eos_id, "token_dtype": m.token_dtype, "tokenizer": m.tokenizer,
            "shard_bytes": opts.get("shard_bytes"), "dedup_window": opts.get("dedup_window"),
            "shards": len(m.shards), "columns": [c.to_json() for c in m.columns]}
        tf = (m.tokenizer or {}).get("file")
        if isinstance(tf, dict):
            replace_file(tok_path, lambda p: shutil.copyfile(fmt.resolve_file(ds.path, tf["path"]), p))
            side["tokenizer_file"] = tok_path.name
        replace_file(side_path, lambda p: p.write_text(json.dumps(side, indent=1, sort_keys=True) + "\n"))
        install_file(tmp, out)  # last: the export appears only once what it refers to is in place
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
