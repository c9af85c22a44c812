"""Prompt/completion joins against whole-row encodings, for every tokenizer in ../shared/tokenizers.

For each tokenizer and each pair of the real data in ../shared/data (HH-RLHF test split: prompt
and completions from pairpack's HH split; the rasbt Alpaca-style sample: the Alpaca prompt and
its chosen/rejected), compares pairpack's ids (prompt encoded alone, each completion encoded as
a continuation) with the tokenizer's encoding of the whole row, and checks that the ids decode
to the row's text. Prints one line per tokenizer and data set, and the rows where the ids differ.

    python tools/check_joins.py [--shared ../shared] [--limit N] [--time]

``--time`` also times encoding the completions as continuations against encoding them alone (the
baseline, measured in the same run), per tokenizer: the cost of the anchor.

Counts (see pairpack.tokenization.check_join): exact = ids equal the whole-row encoding;
boundary = the whole row has a token spanning the join, so no split can equal it; differs = a
join bug (should be 0); text = rows whose decoded ids differ from the decoded whole-row
encoding (should be 0).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pairpack.ingest.shapes import PromptTemplate, split_hh  # noqa: E402
from pairpack.tokenization import check_join, encode_continuations, load_tokenizer  # noqa: E402


def tokenizers(shared: Path) -> list[Path]:
    """Every tokenizer there: ``*.tokenizer.json`` files and model directories."""
    d = shared / "tokenizers"
    return sorted([p for p in d.glob("*.json")] + [p for p in d.iterdir() if (p / "tokenizer.json").is_file()])


def rows(shared: Path, limit: int | None) -> dict[str, list[tuple[str, str]]]:
    """(prompt, completion) rows of each data set (both completions of every pair)."""
    out: dict[str, list[tuple[str, str]]] = {}
    hh = []
    for line in gzip.open(shared / "data" / "hh-rlhf_harmless-base_test.jsonl.gz"):
        r = json.loads(line)
        try:
            p, c, rj = split_hh(r["chosen"], r["rejected"])
        except ValueError:
            continue
        hh += [(p, c), (p, rj)]
    out["hh-rlhf harmless test"] = hh[:limit]
    alpaca = PromptTemplate("alpaca")
    recs = json.loads((shared / "data" / "rasbt_instruction-data-with-preference.json").read_text())
    out["rasbt alpaca sample"] = [(alpaca.render(r), r[k]) for r in recs for k in ("chosen", "rejected")][:limit]
    return out


def check(tok, data: list[tuple[str, str]]) -> tuple[Counter, list[tuple[str, str]], int]:
    """(counts by check_join kind, rows that differ, rows whose ids decode to other text)."""
    counts: Counter = Counter()
    differ = []
    text_bad = 0
    for p, c in data:
        kind = check_join(tok, p, c)
        counts[kind] += 1
        if kind == "differs":
            differ.append((p[-40:], c[:40]))
        ids = list(tok.encode(p)) + list(encode_continuations(tok, [c])[0])
        if tok.decode(ids) != tok.decode(tok.encode(p + c)):
            text_bad += 1
    return counts, differ, text_bad


def time_joins(tok, data: list[tuple[str, str]], repeat: int = 3) -> tuple[float, float]:
    """(seconds to encode the completions alone, as continuations), best of ``repeat``, one
    batch call each as the build makes them."""
    comps = [c for _, c in data]
    ends = [int(tok.encode(p)[-1]) for p, _ in data]
    alone, cont = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tok.encode_batch(comps)
        t1 = time.perf_counter()
        encode_continuations(tok, comps, ends)
        t2 = time.perf_counter()
        alone.append(t1 - t0)
        cont.append(t2 - t1)
    return min(alone), min(cont)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--limit", type=int, default=None, help="rows per data set (default: all)")
    ap.add_argument("--time", action="store_true", help="time continuations against completions alone")
    a = ap.parse_args()
    data = rows(a.shared, a.limit)
    print(f"{'tokenizer':<22} {'data':<24} {'rows':>6} {'exact':>6} {'boundary':>8} {'differs':>7} {'text':>5}  join")
    for path in tokenizers(a.shared):
        tok = load_tokenizer(path)
        for name, d in data.items():
            counts, differ, text_bad = check(tok, d)
            join = f"after {tok.join_anchor!r}" if tok.join_anchor is not None else "alone"
            print(f"{tok.name:<22} {name:<24} {len(d):>6,} {counts['exact']:>6,} {counts['boundary']:>8,} "
                  f"{counts['differs']:>7,} {text_bad:>5,}  {join}")
            for p, c in differ[:5]:
                print(f"    differs: ...{p!r} + {c!r}...")
            if a.time:
                t_alone, t_cont = time_joins(tok, d)
                print(f"    completions alone {t_alone * 1e3:,.1f} ms, as continuations {t_cont * 1e3:,.1f} ms "
                      f"({t_cont / t_alone:.2f}x)")


if __name__ == "__main__":
    main()
