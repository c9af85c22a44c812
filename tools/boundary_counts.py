"""Boundary pairs on the real data, per tokenizer and convention, checked against an independent
whole-row tokenization (docs/inputs-boundaries.md).

For each tokenizer in ../shared/tokenizers and each data set (HH-RLHF harmless test split as HH
transcripts; the rasbt sample with the Alpaca prompt; the rasbt sample as chat records, rendered
with the tokenizer's own template or chatml where its markers are tokens), builds with
``--boundary prompt`` and ``--boundary row`` and prints the build's count of boundary pairs, and
the pairs whose stored rows differ from the ``tokenizers`` package's encoding of the whole row
(prompt text + completion text, or the rendered conversation), counted here independently.

    PYTHONPATH=$PWD python tools/boundary_counts.py [--shared ../shared] [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pairpack  # noqa: E402
from pairpack.ingest.build import build  # noqa: E402
from pairpack.ingest.shapes import ChatRenderer, PromptTemplate, split_hh  # noqa: E402
from pairpack.tokenization import load_tokenizer  # noqa: E402


def datasets(shared: Path, limit: int | None) -> dict[str, tuple[list[dict], str]]:
    """name -> (records, shape)."""
    hh = [json.loads(x) for x in gzip.open(shared / "data" / "hh-rlhf_harmless-base_test.jsonl.gz")][:limit]
    rasbt = json.loads((shared / "data" / "rasbt_instruction-data-with-preference.json").read_text())[:limit]
    alpaca = PromptTemplate("alpaca")
    chat = [{"prompt": [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")}],
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in rasbt]
    # two variants users make: a prompt template ending in a space ("{instruction} "), and chat
    # replies that start with a newline (exports that keep the newline after the assistant header)
    spaced = [{"prompt": r["instruction"] + " ", "chosen": r["chosen"], "rejected": r["rejected"]} for r in rasbt]
    chat_nl = [{"prompt": c["prompt"], "chosen": "\n" + c["chosen"], "rejected": "\n" + c["rejected"]} for c in chat]
    return {"hh": (hh, "hh"), "rasbt-alpaca": ([{"prompt": alpaca.render(r), "chosen": r["chosen"],
                                                 "rejected": r["rejected"]} for r in rasbt], "fields"),
            "rasbt-space": (spaced, "fields"), "rasbt-chat": (chat, "chat"), "rasbt-chat-nl": (chat_nl, "chat")}


def texts(rec: dict, shape: str, renderer: ChatRenderer | None) -> tuple[str, list[str]]:
    """(prompt text, [whole chosen row text, whole rejected row text]) as the build renders them."""
    if shape == "hh":
        p, c, r = split_hh(rec["chosen"], rec["rejected"])
        return p, [p + c, p + r]
    if shape == "fields":
        return rec["prompt"], [rec["prompt"] + rec["chosen"], rec["prompt"] + rec["rejected"]]
    assert renderer is not None
    whole = [renderer.render(rec["prompt"] + [{"role": "assistant", "content": rec[k]}], False)
             for k in ("chosen", "rejected")]
    return renderer.render(rec["prompt"], True), whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    import tokenizers

    d = a.shared / "tokenizers"
    toks = sorted([p for p in d.glob("*.json")] + [p for p in d.iterdir() if (p / "tokenizer.json").is_file()])
    print(f"{'tokenizer':<22} {'data':<13} {'pairs':>6} {'boundary':>9} {'prompt: rows != whole':>22} "
          f"{'row: rows != whole':>19}")
    for tp in toks:
        tok = load_tokenizer(tp)
        raw = tokenizers.Tokenizer.from_file(str(tp / "tokenizer.json" if tp.is_dir() else tp))
        for name, (recs, shape) in datasets(a.shared, a.limit).items():
            template = None
            if shape == "chat":
                template = "tokenizer" if tok.chat_template else ("chatml" if tok.has_token("<|im_start|>") else None)
                if template is None:
                    print(f"{tp.name:<22} {name:<13} (no template of its own and chatml's markers are not tokens)")
                    continue
            renderer = ChatRenderer(tok.chat_template if template == "tokenizer" else "chatml",
                                    bos_token=tok.token_text(tok.bos_id), eos_token=tok.token_text(tok.eos_id)) \
                if shape == "chat" else None
            whole = [[raw.encode(t, add_special_tokens=False).ids for t in texts(r, shape, renderer)[1]] for r in recs]
            got = {}
            with tempfile.TemporaryDirectory() as tmp:
                for conv in ("prompt", "row"):
                    rep = build(recs, Path(tmp) / conv, tokenizer=tok, shape=shape, boundary=conv, add_eos=False,
                                add_bos=False, chat_template=template, workers=1)
                    ds = pairpack.open(Path(tmp) / conv)
                    differ = sum(1 for i in range(len(ds)) if [ds[i].prompt.tolist() + ds[i].chosen.tolist(),
                                                                ds[i].prompt.tolist() + ds[i].rejected.tolist()]
                                 != whole[i])
                    got[conv] = (rep.boundary_pairs, differ, len(ds))
            (bp, dp, n), (br, dr, _) = got["prompt"], got["row"]
            assert bp == br, (bp, br)
            print(f"{tp.name:<22} {name:<13} {n:>6,} {bp:>9,} {dp:>22,} {dr:>19,}")


if __name__ == "__main__":
    main()
