"""Where a prompt ends in a pair's tokens: the boundary conventions of text pairs.

A text pair is a prompt and two completions; its rows are ``prompt + chosen`` and ``prompt +
rejected``. Each row is tokenized whole, as the model sees it, and the prompt alone, as a
generation sees it. Where the whole row's ids start with the prompt's ids (a token boundary where
the prompt ends: the usual case, and the case of every join after a special token), each
completion is the rest of its whole row and both conventions agree. Elsewhere the tokenizer merges
across the join (a space or newline run split between prompt and completion, ``"\\n"`` then
``"\\n\\n"`` becoming one ``"\\n\\n\\n"`` token, a word glued to the prompt) and no split of the
whole row has the prompt's own ids; the pair is a *boundary pair* and the convention decides:

``prompt`` (default for fields, HH, templates)
    The prompt is stored exactly as tokenized alone (what a generation from it would see); the
    completion is encoded as its continuation, so the row differs from the whole row's
    tokenization by the merge at the join.
``row`` (default for chat records; TRL 1.16's convention for every record)
    Rows are exactly the whole row's tokenization; the prompt is the common prefix of the prompt's
    ids and both rows' ids (it loses its last token(s)), each completion the rest of its row.

Byte-level ids (:class:`~pairpack.tokenization.ByteTokenizer`) join exactly: no pair is ever a
boundary pair and the prompt is encoded once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ArgumentError
from ..tokenization import ByteTokenizer, encode_continuations

__all__ = ["BOUNDARIES", "check_boundary", "encode_text_pairs", "default_boundary"]

BOUNDARIES = ("prompt", "row")


def check_boundary(name: str | None) -> str | None:
    """``name`` if it is a boundary convention (or None: the shape's default), else ArgumentError."""
    if name is not None and name not in BOUNDARIES:
        raise ArgumentError(f"unknown boundary convention {name!r}; one of {', '.join(BOUNDARIES)} "
                            "(--boundary prompt|row)")
    return name


def default_boundary(shape: str | None) -> str:
    """The convention a shape gets unless one is given: ``row`` for chat records (the template's
    rendering, tokenized whole, is the model's input), ``prompt`` otherwise."""
    return "row" if shape == "chat" else "prompt"


def _ids(x: Any) -> list[int]:
    return x if type(x) is list else np.asarray(x).reshape(-1).tolist()


def _common(a: list[int], b: list[int], c: list[int]) -> int:
    n = min(len(a), len(b), len(c))
    k = 0
    while k < n and a[k] == b[k] == c[k]:
        k += 1
    return k


# a plain-text cut stays this many characters before the prompt's end, so that nothing a completion
# adds can reach it through a pre-tokenizer's look-ahead (GPT-2's and Qwen's regexes look one
# character ahead) and the row's tokens before it are the prompt's own
_TEXT_CUT_MARGIN = 32


def _text_cut(prompt: str) -> int:
    """Where a long plain-text prompt may be cut for the whole-row encoding (-1: nowhere): the start
    of its last whitespace run (a pre-token boundary of byte-level BPE tokenizers) at least
    :data:`_TEXT_CUT_MARGIN` characters before its end. The cut is used only where the prompt's own
    ids end with the ids of the text after it (checked in :func:`_whole_rows`), else the rows are
    encoded whole."""
    end = len(prompt) - _TEXT_CUT_MARGIN
    if end <= 0:
        return -1
    a = max(prompt.rfind(" ", 0, end), prompt.rfind("\n", 0, end))
    while a > 0 and prompt[a - 1] in " \n\t\r":
        a -= 1
    return a


def _whole_rows(tokenizer: Any, segs: Sequence[tuple[str, str, str]], ps: list[list[int]]) -> list[list[int]]:
    """The whole rows' ids, ``[chosen row, rejected row]`` per pair, flat. Where the prompt holds a
    token that ends the text before it (:meth:`~pairpack.tokenization.HFTokenizer.hard_split_tokens`:
    a chat template's header tokens), only the rows from its last one on are encoded, after the
    prompt's ids up to it (a chat row then costs its last turn, not the whole conversation again);
    likewise a long plain-text prompt from its last whitespace run well before its end
    (:func:`_text_cut`: a text row then costs about its completion, not its prompt twice more). A
    prompt whose own ids do not end with that tail's ids is encoded whole."""
    cuts = tokenizer.hard_split_tokens() if hasattr(tokenizer, "hard_split_tokens") else ()
    at = [max((s[0].rfind(t) for t in cuts), default=-1) if cuts else -1 for s in segs]
    at = [a if a > 0 else _text_cut(s[0]) for s, a in zip(segs, at)]
    texts = []
    for s, a in zip(segs, at):
        texts += [s[0][a:], s[0][a:] + s[1], s[0][a:] + s[2]] if a > 0 else [s[0] + s[1], s[0] + s[2]]
    got = iter([_ids(x) for x in tokenizer.encode_batch(texts)])
    out: list[list[int]] = []
    redo: list[int] = []
    for k, (p, a) in enumerate(zip(ps, at)):
        if a <= 0:
            out += [next(got), next(got)]
            continue
        tail, wc, wr = next(got), next(got), next(got)
        head = len(p) - len(tail)
        if head < 0 or p[head:] != tail:
            redo.append(k)
        out += [p[:head] + wc, p[:head] + wr]
    if redo:
        again = [_ids(x) for x in tokenizer.encode_batch([segs[k][0] + t for k in redo for t in segs[k][1:]])]
        for i, k in enumerate(redo):
            out[2 * k], out[2 * k + 1] = again[2 * i], again[2 * i + 1]
    return out


def encode_text_pairs(tokenizer: Any, segs: Sequence[tuple[str, str, str]], boundary: str
                      ) -> list[tuple[list[list[int]], int]]:
    """``([prompt ids, chosen ids, rejected ids], sides)`` of each text pair, with ``sides`` the
    rows (bit 1 chosen, bit 2 rejected) whose whole tokenization has no token boundary where the
    prompt ends (see the module docstring); ``boundary`` is ``"prompt"`` or ``"row"``. Three
    tokenizer calls for the batch (prompts, whole rows, and continuations of boundary rows only);
    exceptions of the tokenizer propagate (the caller locates the record at fault)."""
    if isinstance(tokenizer, ByteTokenizer):  # bytes join exactly
        return [([_ids(tokenizer.encode(t)) for t in s], 0) for s in segs]
    ps = [_ids(x) for x in tokenizer.encode_batch([s[0] for s in segs])]
    wholes = _whole_rows(tokenizer, segs, ps)
    out: list[tuple[list[list[int]], int]] = []
    redo: list[tuple[int, int]] = []  # (pair, side) encoded as a continuation ("prompt" convention)
    for k, p in enumerate(ps):
        wc, wr = wholes[2 * k], wholes[2 * k + 1]
        n = len(p)
        sides = (wc[:n] != p) | ((wr[:n] != p) << 1)
        if not sides:
            out.append(([p, wc[n:], wr[n:]], 0))
        elif boundary == "row":
            m = _common(p, wc, wr)
            out.append(([p[:m], wc[m:], wr[m:]], sides))
        else:
            out.append(([p, wc[n:], wr[n:]], sides))
            redo += [(k, j) for j in (1, 2) if sides & j]
    if redo:
        texts = [segs[k][j] for k, j in redo]
        after = [ps[k][-1] if ps[k] else None for k, _ in redo]
        for (k, j), ids in zip(redo, encode_continuations(tokenizer, texts, after)):
            out[k][0][j] = _ids(ids)
    return out
