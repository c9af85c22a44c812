"""Write the worked example of spec/FORMAT.md §10 to spec/examples/tiny/.

The only program that writes golden files. Run it when the example changes on purpose; the
test suite checks that the writer still produces these exact bytes (tests/test_golden.py).

    python tools/make_golden.py [--out spec/examples/tiny] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pairpack  # noqa: E402

# FORMAT.md §10: three pairs, the first two share a prompt; ids from a 32-id vocabulary
PAIRS = [
    ([5, 6, 7], [8, 9, 2], [10, 2]),
    ([5, 6, 7], [11, 2], [12, 13, 14, 2]),
    ([15, 16], [17, 2], [18, 19, 2]),
]
SCORES = [1.5, 0.25, -2.0]


def write_example(out: Path, *, force: bool = False) -> None:
    """Write the §10 example dataset at ``out`` with pairpack's own writer."""
    with pairpack.Writer(out, vocab_size=32, pad_id=0, bos_id=1, eos_id=2, force=force,
                         columns={"score": "float32"},
                         column_info={"score": {"description": "example per-pair score"}},
                         provenance={"example": "spec/FORMAT.md §10"}) as w:
        for (p, c, r), s in zip(PAIRS, SCORES):
            w.add(p, c, r, score=s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "spec" / "examples" / "tiny")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    write_example(a.out, force=a.force)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
