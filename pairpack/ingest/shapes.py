"""Record shapes: turning one parsed input record into (prompt, chosen, rejected).

Each segment comes out either as text (``str``) or as token ids (a list of ints); the build
tokenizes text, prompt and completions separately, and concatenates the ids, so the prompt is
an exact prefix of both rows. Four shapes (``--shape``; detected from the first record when not
given, see :func:`detect_shape`):

``fields``
    ``prompt``/``chosen``/``rejected`` fields holding strings or token-id lists (dotted paths).
``hh``
    Only ``chosen``/``rejected`` full transcripts (Anthropic HH-RLHF). The prompt is their longest
    common prefix cut back to the end of the last assistant marker inside it (default
    ``"\\n\\nAssistant:"``); completions are the remainders, so ``prompt + completion ==
    original`` exactly on both sides. See :func:`split_hh`.
``chat``
    Message lists ``[{role, content}]``, ShareGPT ``[{from, value}]`` (roles human/gpt/system), and
    content given as a list of text parts. Rendered with a chat template (built-in ``chatml`` and
    ``hh``, or a Jinja template); the prompt ends with the assistant header and the completion is
    only the final assistant turn. See :class:`ChatRenderer` and :func:`chat_messages`.
``template``
    A composite prompt from a format string over record fields, e.g. Alpaca's ``instruction`` and
    ``input``; ``[[...]]`` marks an optional part dropped when a field in it is missing or empty.
    See :class:`PromptTemplate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Union

from ..errors import ArgumentError, SourceError, import_optional

__all__ = ["SHAPES", "ShapeOptions", "FieldSpec", "detect_shape", "make_extractor", "PromptTemplate", "ChatRenderer"]

Segment = Union[str, list]
SHAPES = ("fields", "hh", "chat", "template")
HH_MARKER = "\n\nAssistant:"

# The Alpaca prompt as the bundled sample's source (rasbt/LLMs-from-scratch ch07) formats it: the
# "### Input:" block only when the record's input is non-empty, and the prompt ends with the
# response header, so the completion (chosen/rejected text) follows it directly.
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}[[\n\n### Input:\n{input}]]"
                   "\n\n### Response:\n")
NAMED_TEMPLATES = {"alpaca": ALPACA_TEMPLATE}


@dataclass(frozen=True)
class FieldSpec:
    """Where the three segments live in a record; dotted paths (``"input.prompt"``) allowed."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


_MISSING = object()


def _get_path(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"`` (integers index lists); a sentinel when absent."""
    if isinstance(obj, dict) and dotted in obj:  # fast path, and keys that contain dots
        return obj[dotted]
    cur = obj
    for part in dotted.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
        if cur is _MISSING:
            return _MISSING
    return cur


def _present(v: Any) -> bool:
    return v is not _MISSING and v is not None


def _segment(value: Any, field: str) -> Segment:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # map(type) runs at C speed; a per-element Python check would dominate pre-tokenized builds
        if value and set(map(type, value)) != {int}:
            bad = next(v for v in value if type(v) is not int)
            raise SourceError(f"token ids must be integers, found {bad!r}", field=field, reason="bad_id")
        return value
    raise SourceError(f"must be a string or a list of token ids, got {type(value).__name__}",
                      field=field, reason="wrong_type")


def _require_dict(data: Any) -> None:
    if not isinstance(data, dict):
        raise SourceError(f"record must be a JSON object, got {type(data).__name__}", reason="wrong_type")


def _extract(data: Any, spec: FieldSpec) -> tuple[Segment, Segment, Segment]:
    """The three segments of a ``fields``-shaped record. Raises SourceError (``field`` set)."""
    _require_dict(data)
    out = []
    for field in (spec.prompt, spec.chosen, spec.rejected):
        v = _get_path(data, field)
        if not _present(v):
            raise SourceError("missing field", field=field, reason="missing_field")
        out.append(_segment(v, field))
    return out[0], out[1], out[2]


# --- hh -----------------------------------------------------------------------------------------
def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by binary search over memcmp-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1] is unknown
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh(chosen: str, rejected: str, marker: str = HH_MARKER) -> tuple[str, str, str]:
    """Split two HH transcripts into (prompt, chosen completion, rejected completion).

    The prompt is the longest common prefix of the two, cut back to the end of the last
    ``marker`` that lies entirely inside it. When the transcripts diverge before their last turn
    the completions span several turns. ``prompt + chosen_c == chosen`` and ``prompt + rejected_c
    == rejected`` always hold.

    Raises SourceError: reason "hh_no_marker" when the common prefix holds no marker, "empty"
    when a completion would be empty.
    """
    n = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(marker, 0, n)
    if cut < 0 or not marker:
        raise SourceError(f"no assistant marker {marker!r} in the text shared by chosen and rejected "
                          f"(shared prefix: {n} characters); cannot find the prompt", field="chosen",
                          reason="hh_no_marker")
    end = cut + len(marker)
    prompt = chosen[:end]
    c, r = chosen[end:], rejected[end:]
    if not c or not r:
        raise SourceError("completion after the last shared assistant marker is empty",
                          field="chosen" if not c else "rejected", reason="empty")
    return prompt, c, r


# --- template -----------------------------------------------------------------------------------
class PromptTemplate:
    """A composite prompt over record fields.

    Syntax: ``{path}`` inserts a field (dotted path; strings as they are, numbers via ``str``),
    ``{{`` and ``}}`` are literal braces, and ``[[ ... ]]`` is an optional part rendered only when
    every field inside it is present and non-empty (so an empty Alpaca ``input`` leaves no
    dangling separator). A field outside ``[[...]]`` must be present (empty strings are kept).
    ``alpaca`` names the built-in :data:`ALPACA_TEMPLATE`.

    Example:
        >>> PromptTemplate("{instruction}[[\\n\\n{input}]]").render({"instruction": "Hi", "input": ""})
        'Hi'
    """

    def __init__(self, source: str) -> None:
        self.name = source if source in NAMED_TEMPLATES else None
        self.source = NAMED_TEMPLATES.get(source, source)
        self.parts = self._parse(self.source)
        self.fields = [p[1] for p in self._walk(self.parts) if p[0] == "field"]

    @staticmethod
    def _walk(parts: list) -> list:
        out = []
        for p in parts:
            out += PromptTemplate._walk(p[1]) if p[0] == "opt" else [p]
        return out

    def _parse(self, s: str) -> list:
        top: list = []
        cur = top
        i = 0
        lit: list[str] = []

        def flush() -> None:
            if lit:
                cur.append(("lit", "".join(lit)))
                lit.clear()

        while i < len(s):
            ch = s[i]
            if s.startswith("{{", i) or s.startswith("}}", i):
                lit.append(ch)
                i += 2
            elif ch == "{":
                j = s.find("}", i)
                name = s[i + 1:j] if j > 0 else ""
                if j < 0 or not name or "{" in name:
                    raise ArgumentError(f"prompt template: unclosed or empty field at character {i}: {s!r}")
                flush()
                cur.append(("field", name.strip()))
                i = j + 1
            elif ch == "}":
                raise ArgumentError(f"prompt template: single '}}' at character {i} (write '}}}}'): {s!r}")
            elif s.startswith("[[", i):
                if cur is not top:
                    raise ArgumentError(f"prompt template: nested '[[' at character {i}: {s!r}")
                flush()
                cur = []
                i += 2
            elif s.startswith("]]", i) and cur is not top:
                flush()
                top.append(("opt", cur))
                cur = top
                i += 2
            else:
                lit.append(ch)
                i += 1
        if cur is not top:
            raise ArgumentError(f"prompt template: '[[' without ']]': {s!r}")
        flush()
        return top

    @staticmethod
    def _value(data: Any, path: str) -> str | None:
        v = _get_path(data, path)
        if not _present(v):
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SourceError(f"template field must be a string or number, got {type(v).__name__}",
                              field=path, reason="wrong_type")
        return v if isinstance(v, str) else str(v)

    def render(self, data: Any) -> str:
        """The prompt text of record ``data``. Raises SourceError for a missing required field."""
        _require_dict(data)
        out: list[str] = []
        for kind, x in self.parts:
            if kind == "lit":
                out.append(x)
            elif kind == "field":
                v = self._value(data, x)
                if v is None:
                    raise SourceError("missing field (used by the prompt template)", field=x,
                                      reason="missing_field")
                out.append(v)
            else:
                piece: list[str] = []
                for k2, y in x:
                    if k2 == "lit":
                        piece.append(y)
                        continue
                    v = self._value(data, y)
                    if not v:
                        piece = []
                        break
                    piece.append(v)
                out += piece
        return "".join(out)


# --- chat ---------------------------------------------------------------------------------------
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
          "model": "assistant", "system": "system", "tool": "tool"}


def _content_text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise SourceError(f"only text content parts are supported, found {kind!r}", field=field,
                                  reason="chat_content")
        return "".join(out)
    raise SourceError(f"message content must be a string or a list of text parts, got {type(content).__name__}",
                      field=field, reason="chat_content")


def normalize_message(m: Any, field: str) -> dict[str, str]:
    """``{role, content}`` or ShareGPT ``{from, value}`` -> ``{"role", "content"}`` with roles
    user/assistant/system/tool (human -> user, gpt -> assistant) and content joined from text parts."""
    if not isinstance(m, dict):
        raise SourceError(f"a message must be an object, got {type(m).__name__}", field=field, reason="chat_message")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if not isinstance(role, str) or content is None:
        raise SourceError("a message needs role/content (or from/value)", field=field, reason="chat_message")
    r = _ROLES.get(role.lower())
    if r is None:
        raise SourceError(f"unknown message role {role!r} (known: {', '.join(sorted(_ROLES))})", field=field,
                          reason="chat_message")
    return {"role": r, "content": _content_text(content, field)}


def _as_messages(v: Any, field: str, *, default_role: str) -> list[dict[str, str]]:
    if isinstance(v, str):
        return [{"role": default_role, "content": v}]
    if isinstance(v, dict):
        return [normalize_message(v, field)]
    if isinstance(v, list):
        return [normalize_message(m, f"{field}.{i}") for i, m in enumerate(v)]
    raise SourceError(f"must be messages, a message or a string, got {type(v).__name__}", field=field,
                      reason="wrong_type")


def _is_messages(v: Any) -> bool:
    if isinstance(v, dict):
        return ("role" in v or "from" in v)
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict)


def chat_messages(data: Any, spec: FieldSpec) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """(prompt messages, chosen final message, rejected final message) of a chat record.

    Two forms: (a) a prompt field (messages, one message, or a string taken as a user message)
    with completions given as a message, a one-message list, or a string; (b) chosen and rejected
    as full conversations (more than one message each, or a prompt field that is absent): the
    prompt is the list of messages before their final assistant turns, which must be equal
    (conversations that differ earlier are invalid: reason "chat_diverged"), and any prompt
    field is ignored. Final messages must have role assistant.
    """
    _require_dict(data)
    c_raw, r_raw = _get_path(data, spec.chosen), _get_path(data, spec.rejected)
    for v, f in ((c_raw, spec.chosen), (r_raw, spec.rejected)):
        if not _present(v):
            raise SourceError("missing field", field=f, reason="missing_field")
    cm = _as_messages(c_raw, spec.chosen, default_role="assistant")
    rm = _as_messages(r_raw, spec.rejected, default_role="assistant")
    for msgs, f in ((cm, spec.chosen), (rm, spec.rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise SourceError("the last message must be an assistant turn", field=f, reason="chat_no_assistant")
    p_raw = _get_path(data, spec.prompt)
    if len(cm) > 1 or len(rm) > 1 or not _present(p_raw):
        hc, hr = cm[:-1], rm[:-1]
        if hc != hr:
            k = next((i for i, (a, b) in enumerate(zip(hc, hr)) if a != b), min(len(hc), len(hr)))
            raise SourceError(f"chosen and rejected conversations differ before their final assistant turn "
                              f"(first difference at message {k}); only the final turn can be compared",
                              field=spec.chosen, reason="chat_diverged")
        prompt = hc
        if not prompt:
            if _present(p_raw):
                prompt = _as_messages(p_raw, spec.prompt, default_role="user")
            else:
                raise SourceError("no prompt: no prompt field and no messages before the final assistant turn",
                                  field=spec.prompt, reason="missing_field")
    else:
        prompt = _as_messages(p_raw, spec.prompt, default_role="user")
    if not prompt:
        raise SourceError("prompt has no messages", field=spec.prompt, reason="empty")
    return prompt, cm[-1], rm[-1]


_SANDBOX_ENV: Any = None


class ChatRenderer:
    """Renders message lists to text with a chat template.

    ``template`` is ``"chatml"`` (``<|im_start|>role\\ncontent<|im_end|>\\n``; generation prompt
    ``<|im_start|>assistant\\n``), ``"hh"`` (``\\n\\nHuman: ...`` / ``\\n\\nAssistant: ...``;
    generation prompt ``\\n\\nAssistant:``), a path to a Jinja template file (or to a
    ``tokenizer_config.json`` whose ``chat_template`` is used), or Jinja source. Jinja templates
    see ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, and run in a
    sandbox (as in ``transformers``: ``trim_blocks``, ``lstrip_blocks``).
    """

    def __init__(self, template: str = "chatml", *, bos_token: str = "", eos_token: str = "") -> None:
        self.spec = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.kind = template if template in ("chatml", "hh") else "jinja"
        self.source = None
        if self.kind == "jinja":
            if "{%" in template or "{{" in template:
                self.source = template
            else:
                p = Path(template)
                try:
                    text = p.read_text(encoding="utf-8")
                except OSError as e:
                    raise ArgumentError(f"{template}: cannot read chat template ({e.strerror or e}); "
                                     "use chatml, hh or a Jinja template file") from None
                if p.suffix == ".json":
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise ArgumentError(f"{template}: not valid JSON ({e})") from None
                    text = obj.get("chat_template") if isinstance(obj, dict) else None
                    if isinstance(text, list):  # [{"name": "default", "template": ...}, ...]
                        text = next((t.get("template") for t in text if t.get("name") == "default"), None)
                    if not isinstance(text, str):
                        raise ArgumentError(f"{template}: no chat_template string in this JSON file")
                self.source = text
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_compiled"] = None  # jinja templates do not pickle; recompiled lazily in workers
        return d

    def _jinja(self) -> Any:
        if self._compiled is None:
            global _SANDBOX_ENV
            if _SANDBOX_ENV is None:
                sandbox = import_optional("jinja2.sandbox", feature="a Jinja chat template", extra="hf")

                def raise_exception(msg: str) -> None:
                    raise ValueError(msg)

                env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = raise_exception
                env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                    x, indent=indent, ensure_ascii=ensure_ascii)
                _SANDBOX_ENV = env
            self._compiled = _SANDBOX_ENV.from_string(self.source)
        return self._compiled

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Text of ``messages``; with ``add_generation_prompt`` it ends with the assistant header."""
        if self.kind == "chatml":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.kind == "hh":
            names = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
            text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
            return text + ("\n\nAssistant:" if add_generation_prompt else "")
        try:
            return self._jinja().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # noqa: BLE001 - template code can raise anything
            raise SourceError(f"chat template failed: {type(e).__name__}: {str(e)[:200]}",
                              reason="chat_template") from None

    def split(self, prompt: list[dict[str, str]], final: dict[str, str], field: str) -> tuple[str, str]:
        """(prompt text ending with the generation prompt, completion text of ``final`` alone).

        The completion is the full rendering minus the prompt rendering; a template for which the
        prompt is not a prefix of the full text is refused (reason "chat_template").
        """
        try:
            p = self.render(prompt, True)
            full = self.render(prompt + [final], False)
        except SourceError as e:
            raise SourceError(e.detail, field=e.field or field, reason=e.reason) from None
        if not full.startswith(p) or len(full) == len(p):
            raise SourceError("the chat template's rendering of the prompt (with generation prompt) is not a "
                              "strict prefix of its rendering with the final assistant turn", field=field,
                              reason="chat_template")
        return p, full[len(p):]


# --- shape options, detection, extractors ---------------------------------------------------
@dataclass(frozen=True)
class ShapeOptions:
    """How records are read: shape (None: detect), fields, templates and the HH marker."""

    shape: str | None = None
    spec: FieldSpec = FieldSpec()
    prompt_template: str | None = None
    chat_template: str = "chatml"
    hh_marker: str = HH_MARKER

    def __post_init__(self) -> None:
        if self.shape is not None and self.shape not in SHAPES:
            raise ArgumentError(f"unknown shape {self.shape!r}; one of {', '.join(SHAPES)}")
        if self.shape == "template" and not self.prompt_template:
            raise ArgumentError("shape 'template' needs a prompt template (--prompt-template)")
        if self.prompt_template:
            PromptTemplate(self.prompt_template)  # syntax errors surface before any record is read

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "prompt": self.spec.prompt, "chosen": self.spec.chosen,
                "rejected": self.spec.rejected, "prompt_template": self.prompt_template,
                "chat_template": self.chat_template if self.shape == "chat" else None,
                "hh_marker": self.hh_marker if self.shape == "hh" else None}


def detect_shape(record: Any, opts: ShapeOptions) -> ShapeOptions | None:
    """The options with ``shape`` resolved from one record, or None when this record says nothing
    (not an object, or chosen/rejected absent).

    Rules, in order: a forced shape wins; a prompt template means ``template``; chosen, rejected
    or prompt holding messages means ``chat``; a prompt field means ``fields``; string
    chosen/rejected with an ``instruction`` field means ``template`` with the built-in Alpaca
    template; other string chosen/rejected mean ``hh``.
    """
    if opts.shape is not None:
        return opts
    if opts.prompt_template:
        return replace(opts, shape="template")
    if not isinstance(record, dict):
        return None
    s = opts.spec
    c, r, p = _get_path(record, s.chosen), _get_path(record, s.rejected), _get_path(record, s.prompt)
    if not (_present(c) and _present(r)):
        return None
    if _is_messages(c) or _is_messages(r) or _is_messages(p):
        return replace(opts, shape="chat")
    if _present(p):
        return replace(opts, shape="fields")
    if isinstance(c, str) and isinstance(r, str):
        if isinstance(record.get("instruction"), str):
            return replace(opts, shape="template", prompt_template="alpaca")
        return replace(opts, shape="hh")
    return replace(opts, shape="fields")


def make_extractor(opts: ShapeOptions, tokenizer: Any = None) -> Callable[[Any], tuple[Segment, Segment, Segment]]:
    """A function record -> (prompt, chosen, rejected) for a resolved ``opts.shape``.

    Raises SourceError (``field`` and ``reason`` set, no path/line) for an invalid record.
    """
    s = opts.spec
    shape = opts.shape or "fields"
    if shape == "fields":
        return lambda data: _extract(data, s)
    if shape == "hh":
        marker = opts.hh_marker

        def hh(data: Any) -> tuple[Segment, Segment, Segment]:
            _require_dict(data)
            c, r = _get_path(data, s.chosen), _get_path(data, s.rejected)
            for v, f in ((c, s.chosen), (r, s.rejected)):
                if not _present(v):
                    raise SourceError("missing field", field=f, reason="missing_field")
                if not isinstance(v, str):
                    raise SourceError(f"hh transcripts must be strings, got {type(v).__name__}", field=f,
                                      reason="wrong_type")
            try:
                return split_hh(c, r, marker)
            except SourceError as e:
                raise SourceError(e.detail, field=s.chosen if e.field == "chosen" else s.rejected,
                                  reason=e.reason) from None
        return hh
    if shape == "template":
        tmpl = PromptTemplate(opts.prompt_template or "")

        def templ(data: Any) -> tuple[Segment, Segment, Segment]:
            _require_dict(data)
            prompt = tmpl.render(data)
            out = []
            for f in (s.chosen, s.rejected):
                v = _get_path(data, f)
                if not _present(v):
                    raise SourceError("missing field", field=f, reason="missing_field")
                if not isinstance(v, str):
                    raise SourceError(f"must be a string with a prompt template, got {type(v).__name__}",
                                      field=f, reason="wrong_type")
                out.append(v)
            return prompt, out[0], out[1]
        return templ
    # chat
    tok = tokenizer
    bos = tok.token_text(tok.bos_id) if tok is not None and hasattr(tok, "token_text") else ""
    eos = tok.token_text(tok.eos_id) if tok is not None and hasattr(tok, "token_text") else ""
    renderer = ChatRenderer(opts.chat_template, bos_token=bos, eos_token=eos)

    def chat(data: Any) -> tuple[Segment, Segment, Segment]:
        prompt, cf, rf = chat_messages(data, s)
        p, c = renderer.split(prompt, cf, s.chosen)
        _, r = renderer.split(prompt, rf, s.rejected)
        return p, c, r
    return chat

