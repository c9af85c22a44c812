"""Disk use of multi-completion builds: shared completions against binarised pairs.

Turns the bundled sample (1,100 Alpaca-style records with `chosen` and `rejected` answers; its
`output` always equals one of them) into UltraFeedback-shaped records with three rated completions
each (chosen 8; the first half of chosen's words, an unfinished answer, 5; rejected, an impolite
rewrite, 2), builds them with each pair
rule, and builds the same pairs binarised (one prompt/chosen/rejected record per pair, what users
do by hand today). Prints the tokens stored (the unique tokens, for the shared build) and the
dataset's bytes (every file and the manifest, less the copied tokenizer.json).

    PYTHONPATH=$PWD python3 tools/multi_disk.py [TOKENIZER.json]   # default: the byte tokenizer
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pairpack
from pairpack.ingest.multi import PairRule

SAMPLE = Path(__file__).resolve().parent.parent / "pairpack" / "data" / "instruction-data-with-preference.json"


def main() -> None:
    tok = sys.argv[1] if len(sys.argv) > 1 else None
    rows = json.loads(SAMPLE.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        multi = t / "multi.jsonl"
        recs = []
        for r in rows:
            prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            recs.append({"prompt": prompt, "completions": [
                {"response": r["chosen"], "overall_score": 8},
                {"response": " ".join(r["chosen"].split()[: max(1, len(r["chosen"].split()) // 2)]),
                 "overall_score": 5},
                {"response": r["rejected"], "overall_score": 2}]})
        multi.write_text("".join(json.dumps(x) + "\n" for x in recs))
        print(f"{'rule':<11} {'pairs':>6} {'tokens stored':>14} {'binarised':>10} {'bytes':>10} "
              f"{'binarised':>10} {'vs binarised':>13} {'bytes / token bytes':>20}")
        for rule in ("best-worst", "best-rest", "margin:1"):
            rep = pairpack.build(multi, t / rule, pairs=rule, tokenizer=tok, workers=1)
            item = 2 if rep.token_dtype == "uint16" else 4
            flat = t / f"{rule}.flat.jsonl"
            with flat.open("w") as f:
                for x in recs:
                    sc = [c["overall_score"] for c in x["completions"]]
                    for c, j in PairRule.parse(rule).pairs(sc)[0]:
                        f.write(json.dumps({"prompt": x["prompt"], "chosen": x["completions"][c]["response"],
                                            "rejected": x["completions"][j]["response"]}) + "\n")
            frep = pairpack.build(flat, t / f"{rule}.flat", tokenizer=tok, workers=1, shape="fields")
            assert pairpack.open(t / rule).verify() == []
            size, fsize = _bytes(t / rule), _bytes(t / f"{rule}.flat")
            print(f"{rule:<11} {rep.pairs:>6,} {rep.tokens:>14,} {frep.tokens:>10,} {size:>10,} {fsize:>10,} "
                  f"{size / fsize:>12.3f}x {size / (rep.tokens * item):>19.3f}x")


def _bytes(path: Path) -> int:
    m = pairpack.open(path).manifest
    tok = (m.tokenizer or {}).get("file", {}).get("path")
    return sum(e.bytes for e in m.files() if e.path != tok) + len(m.dumps())


if __name__ == "__main__":
    main()
