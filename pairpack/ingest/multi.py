"""Multi-completion records: one prompt with N rated completions, turned into preference pairs.

Two record layouts are read (field names configurable, dotted paths allowed):

``completions`` (UltraFeedback)
    ``{"instruction" | "prompt": ..., "completions": [{"response": ..., "overall_score": 8.5, ...}, ...]}``
``responses`` + ``scores`` (generic)
    ``{"prompt": ..., "responses": [...], "scores": [...]}``

Prompt and responses are text or token-id lists (all of one kind within a record). A
:class:`PairRule` picks the pairs; a pair's chosen completion always has the strictly higher
score, and equal scores never make a pair (they are skipped and counted as ties). The build stores
each distinct completion of a record once and lets its pairs share it (spec/FORMAT.md §7.6); the
two scores become the per-pair columns ``score_chosen`` and ``score_rejected``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import SourceError
from .shapes import _present, get_path

__all__ = ["PairRule", "MultiSpec", "MultiOptions", "PAIR_RULES", "SCORE_COLUMNS", "is_multi", "extract_multi"]

PAIR_RULES = ("best-worst", "best-rest", "margin:X")
SCORE_COLUMNS = {"score_chosen": "float32", "score_rejected": "float32"}
SCORE_KEYS = ("overall_score", "score", "rating")  # tried in order when no score key is given
_PROMPT_KEYS = ("prompt", "instruction")


@dataclass(frozen=True)
class PairRule:
    """How the rated completions of one record become pairs.

    ``best-worst``: one pair, the highest score against the lowest.
    ``best-rest``: the highest score against every other completion.
    ``margin:X``: every two completions whose scores differ by at least ``X`` (> 0 or = 0).
    The best (worst) is the first completion, in record order, with the highest (lowest) score.
    Pairs with equal scores are never made; they are counted as ties.
    """

    kind: str
    margin: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "PairRule":
        """``"best-worst"``, ``"best-rest"`` or ``"margin:X"``; ValueError names the accepted forms."""
        t = text.strip().lower()
        if t in ("best-worst", "best-rest"):
            return cls(t)
        if t.startswith("margin:"):
            try:
                m = float(t[len("margin:"):])
            except ValueError:
                m = math.nan
            if not (math.isfinite(m) and m >= 0):
                raise ValueError(f"pair rule {text!r}: the margin must be a finite number >= 0, e.g. margin:0.5")
            return cls("margin", m)
        raise ValueError(f"unknown pair rule {text!r}; one of best-worst, best-rest, margin:X (e.g. margin:0.5)")

    def __str__(self) -> str:
        return f"margin:{self.margin:g}" if self.kind == "margin" else self.kind

    def pairs(self, scores: list[float]) -> tuple[list[tuple[int, int]], int, int]:
        """``(pairs, ties, below_margin)``: ``(chosen, rejected)`` indices into ``scores`` in a fixed
        order, the candidate pairs skipped for equal scores, and those skipped for a gap under the
        margin."""
        n = len(scores)
        if n < 2:
            return [], 0, 0
        if self.kind in ("best-worst", "best-rest"):
            best = max(range(n), key=lambda i: (scores[i], -i))
            if self.kind == "best-worst":
                worst = min(range(n), key=lambda i: (scores[i], i))
                return ([], 1, 0) if scores[worst] == scores[best] else ([(best, worst)], 0, 0)
            out = [(best, j) for j in range(n) if j != best and scores[j] < scores[best]]
            return out, n - 1 - len(out), 0
        out, ties, below = [], 0, 0
        for i in range(n):
            for j in range(i + 1, n):
                a, b = scores[i], scores[j]
                if a == b:
                    ties += 1
                elif abs(a - b) < self.margin:
                    below += 1
                else:
                    out.append((i, j) if a > b else (j, i))
        return out, ties, below


@dataclass(frozen=True)
class MultiSpec:
    """Where a multi-completion record keeps its parts (dotted paths allowed).

    prompt: the prompt field; None tries ``prompt`` then ``instruction``.
    completions: the list of completion objects; their text under ``response_key``.
    responses, scores: the generic layout's parallel lists.
    score_key: the score inside a completion object; None tries ``overall_score``, ``score``,
        ``rating``.
    """

    prompt: str | None = None
    completions: str = "completions"
    response_key: str = "response"
    responses: str = "responses"
    scores: str = "scores"
    score_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_multi(record: Any, spec: MultiSpec) -> bool:
    """Whether ``record`` looks like a multi-completion record (list of completion objects, or
    parallel responses/scores lists)."""
    if not isinstance(record, dict):
        return False
    c = get_path(record, spec.completions)
    if isinstance(c, list) and c and all(isinstance(x, dict) for x in c):
        return True
    return isinstance(get_path(record, spec.responses), list) and isinstance(get_path(record, spec.scores), list)


def _score(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SourceError(f"score must be a finite number, got {v!r}", field=field, reason="bad_score")
    return float(v)


def _text_or_ids(v: Any, field: str) -> str | list:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and set(map(type, v)) == {int}:
        return v
    if isinstance(v, list) and not v:
        raise SourceError("is empty", field=field, reason="empty")
    raise SourceError(f"must be a string or a list of token ids, got {type(v).__name__}", field=field,
                      reason="wrong_type")


def extract_multi(record: Any, spec: MultiSpec, prompt_text: str | None = None) -> tuple[str | list, list, list[float]]:
    """``(prompt, completions, scores)`` of one record. ``prompt_text`` (a rendered prompt template)
    replaces the prompt field. Raises SourceError (``field`` set) for a malformed record."""
    if not isinstance(record, dict):
        raise SourceError(f"record must be a JSON object, got {type(record).__name__}", reason="wrong_type")
    if prompt_text is not None:
        prompt: str | list = prompt_text
    else:
        keys = (spec.prompt,) if spec.prompt else _PROMPT_KEYS
        found = next(((k, v) for k in keys if (v := get_path(record, k)) is not None and _present(v)), None)
        if found is None:
            raise SourceError("missing field", field=keys[0], reason="missing_field")
        prompt = _text_or_ids(found[1], found[0])
    comps = get_path(record, spec.completions)
    texts: list = []
    scores: list[float] = []
    if isinstance(comps, list) and _present(comps):
        for i, c in enumerate(comps):
            where = f"{spec.completions}.{i}"
            if not isinstance(c, dict):
                raise SourceError(f"completion must be an object, got {type(c).__name__}", field=where,
                                  reason="wrong_type")
            r = c.get(spec.response_key)
            if r is None:
                raise SourceError("missing field", field=f"{where}.{spec.response_key}", reason="missing_field")
            texts.append(_text_or_ids(r, f"{where}.{spec.response_key}"))
            keys = (spec.score_key,) if spec.score_key else SCORE_KEYS
            k = next((k for k in keys if c.get(k) is not None), None)
            if k is None:
                raise SourceError(f"missing score (looked for {', '.join(keys)}; --score-key names another)",
                                  field=f"{where}.{keys[0]}", reason="missing_score")
            scores.append(_score(c[k], f"{where}.{k}"))
    else:
        resp, sc = get_path(record, spec.responses), get_path(record, spec.scores)
        for v, f in ((resp, spec.responses), (sc, spec.scores)):
            if not isinstance(v, list) or not _present(v):
                raise SourceError(f"missing list (or {spec.completions!r} objects)", field=f, reason="missing_field")
        if len(resp) != len(sc):
            raise SourceError(f"{len(resp)} responses but {len(sc)} scores", field=spec.scores,
                              reason="length_mismatch")
        texts = [_text_or_ids(r, f"{spec.responses}.{i}") for i, r in enumerate(resp)]
        scores = [_score(s, f"{spec.scores}.{i}") for i, s in enumerate(sc)]
    kinds = {isinstance(x, str) for x in [prompt, *texts]}
    if len(kinds) != 1:
        raise SourceError("mixes text and token ids between prompt and completions", reason="mixed_types")
    return prompt, texts, scores


@dataclass(frozen=True)
class MultiOptions:
    """A multi-completion build: where the parts are, the pair rule, an optional prompt template."""

    spec: MultiSpec
    rule: PairRule
    prompt_template: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"multi": {**self.spec.to_json(), "pairs": str(self.rule)}, "prompt_template": self.prompt_template}
