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
    content given as a list of text parts (``{"type": "text", "text"|"value": ...}``). Rendered
    with a chat template (built-in ``chatml`` and ``hh``, or a Jinja template, which also sees the
    record's ``tools`` and ``chat_template_kwargs``); the prompt ends with the assistant header and
    the completion is only the final assistant turn. ShareGPT records with a ``conversations``
    prompt and OpenAI preference records (``input.messages``, ``preferred_output``,
    ``non_preferred_output``) are recognised by :func:`detect_shape`. See :class:`ChatRenderer` and
    :func:`chat_messages`.
``template``
    A composite prompt from a format string over record fields, e.g. Alpaca's ``instruction`` and
    ``input``; ``[[...]]`` marks an optional part dropped when a field in it is missing or empty.
    See :class:`PromptTemplate`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field as dc_field, replace
from pathlib import Path
from typing import Any, Callable, Union

from ..errors import ArgumentError, SourceError, import_optional
from .templates import NAMED_CHAT_TEMPLATES

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

    def flag(self, field: str) -> str:
        """The command-line flag that names ``field`` (``--prompt``, ``--chosen``, ``--rejected``)."""
        for role in ("prompt", "chosen", "rejected"):
            if getattr(self, role) == field:
                return f"--{role}"
        return "--prompt/--chosen/--rejected"


_MISSING = object()
MISSING = _MISSING  # what get_path returns for an absent path
_KEYS_SHOWN = 12  # record keys listed in an error message


def _keys_text(data: Any, prefix: str = "") -> list[str]:
    """The record's keys (under dotted ``prefix``), for error messages."""
    cur = get_path(data, prefix) if prefix else data
    return [str(k) for k in cur] if isinstance(cur, dict) else []


def _nested_paths(data: Any, depth: int = 3, prefix: str = "") -> list[str]:
    """Dotted paths of the keys of objects inside the record (below its top level), for suggestions."""
    out: list[str] = []
    if depth <= 0 or not isinstance(data, dict):
        return out
    for k, v in list(data.items())[:64]:
        if isinstance(v, dict):
            for k2 in list(v)[:64]:
                out.append(f"{prefix}{k}.{k2}")
            out += _nested_paths(v, depth - 1, f"{prefix}{k}.")
    return list(dict.fromkeys(out))


# fields that hold a role under other names in common datasets (stack-exchange-paired: response_j is
# the preferred answer), suggested when no key is similar to the role's default name
_ROLE_NAMES = {"prompt": ("question", "instruction", "query", "input", "context", "history"),
               "chosen": ("response_j", "chosen_response", "preferred", "better", "accepted", "winner"),
               "rejected": ("response_k", "rejected_response", "dispreferred", "worse", "loser")}


def _suggest(data: Any, field: str, keys: list[str], parent: str) -> str | None:
    """The record's field most like ``field``: a nested path with the same last name first
    (``metadata.score_chosen`` for ``score_chosen``), else the closest key, else a key that holds
    the role under a common other name (``question`` for ``prompt``), else the closest nested path."""
    leaf = field.rsplit(".", 1)[-1]
    nested = [p for p in _nested_paths(data) if p != field]
    same = [p for p in nested if p.rsplit(".", 1)[-1] == leaf]
    if same:
        return same[0]
    near = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.6)
    if near:
        return f"{parent}.{near[0]}" if parent else near[0]
    alias = next((k for k in _ROLE_NAMES.get(field, ()) if k in keys and not parent), None)
    if alias:
        return alias
    leaves = {p.rsplit(".", 1)[-1]: p for p in reversed(nested)}
    near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[near[0]] if near else None


def missing_field(data: Any, field: str, spec: "FieldSpec | None" = None, what: str = "missing field",
                  flag: str | None = None) -> SourceError:
    """The SourceError of an absent ``field``: it lists the record's keys (those of the dotted
    path's parent for a dotted path), suggests the most similar field (nested paths included), and
    names the flag that fixes it (``flag``, else the one of ``spec``)."""
    return missing_fields(data, [field], spec, what, flag)


def missing_fields(data: Any, fields: list[str], spec: "FieldSpec | None" = None, what: str = "missing field",
                   flag: str | list[str] | None = None) -> SourceError:
    """One SourceError for every absent field of a record: ``field`` is the first, the message
    names them all with the record's keys, a suggestion for each, and the flags that fix them
    (``flag``: one for all, or one per field; else those of ``spec``)."""
    field = fields[0]
    parent = field.rsplit(".", 1)[0] if "." in field and not (isinstance(data, dict) and field in data) else ""
    keys = _keys_text(data, parent)
    shown = ", ".join(keys[:_KEYS_SHOWN]) + (f", ... ({len(keys)} keys)" if len(keys) > _KEYS_SHOWN else "")
    where = f"under {parent!r} " if parent else ""
    given = flag if isinstance(flag, list) else [flag] * len(fields)
    flags = [fl or (spec.flag(f) if spec is not None else "--prompt/--chosen/--rejected") for f, fl in zip(fields, given)]
    hints = [_suggest(data, f, keys, parent) for f in fields]
    if len(fields) == 1:
        msg = f"{what}; the record's keys {where}are {shown or '(none)'}"
        return SourceError(msg + (f"; did you mean {hints[0]!r}? Name the field with {flags[0]} NAME" if hints[0]
                                  else f"; name the field with {flags[0]} NAME"), field=field, reason="missing_field")
    named = ", ".join(repr(f) for f in fields)
    fixes = " ".join(f"{fl} {h if h else 'NAME'}" for fl, h in zip(flags, hints))
    guessed = " (fields guessed by similarity)" if any(hints) else ""
    msg = (f"missing fields {named}; the record's keys {where}are {shown or '(none)'}; "
           f"name them with {fixes}{guessed}")
    return SourceError(msg, field=field, reason="missing_field")


def get_path(obj: Any, dotted: str) -> Any:
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
    fields = (spec.prompt, spec.chosen, spec.rejected)
    values = [get_path(data, f) for f in fields]
    missing = [f for f, v in zip(fields, values) if not _present(v)]
    if missing:
        raise missing_fields(data, missing, spec)
    return _segment(values[0], fields[0]), _segment(values[1], fields[1]), _segment(values[2], fields[2])


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
        self.required = [p[1] for p in self.parts if p[0] == "field"]  # outside [[...]]: must be present

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
        v = get_path(data, path)
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
                    raise missing_field(data, x, what="missing field (used by the prompt template)")
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
    """Text of a message's content: a string, or text parts ``{"type": "text", "text": ...}``
    (``"value"`` instead of ``"text"`` in some training frameworks' newer formats) and strings."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, dict):
                raise SourceError(f"content part {i} must be an object or a string, got {type(part).__name__}",
                                  field=field, reason="chat_content")
            kind = part.get("type", "text")
            if kind != "text":
                raise SourceError(f"content part {i} has type {kind!r}: only text parts are supported "
                                  "(images, audio and other media cannot be tokenized as text)", field=field,
                                  reason="chat_content")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise SourceError(f"text content part {i} has no 'text' (or 'value') string; its keys are "
                                  f"{', '.join(map(str, part)) or '(none)'}", field=field, reason="chat_content")
            out.append(text)
        return "".join(out)
    raise SourceError(f"message content must be a string or a list of text parts, got {type(content).__name__}",
                      field=field, reason="chat_content")


# keys of a message that are its role and content in one of the dialects (not passed on as extras)
_DIALECT_KEYS = ("role", "from", "content", "value")


def normalize_message(m: Any, field: str) -> dict[str, Any]:
    """``{role, content}`` or ShareGPT ``{from, value}`` -> ``{"role", "content", ...}`` with roles
    user/assistant/system/tool (human -> user, gpt -> assistant) and content joined from text parts.
    Other keys (``tool_calls``, ``name``, ``reasoning_content``, ...) are kept for Jinja templates."""
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
    out = {"role": r, "content": _content_text(content, field)}
    if len(m) > 2:
        out.update((k, v) for k, v in m.items() if k not in _DIALECT_KEYS)
    return out


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
    c_raw, r_raw = get_path(data, spec.chosen), get_path(data, spec.rejected)
    missing = [f for v, f in ((c_raw, spec.chosen), (r_raw, spec.rejected)) if not _present(v)]
    if missing:
        raise missing_fields(data, missing, spec)
    cm = _as_messages(c_raw, spec.chosen, default_role="assistant")
    rm = _as_messages(r_raw, spec.rejected, default_role="assistant")
    for msgs, f in ((cm, spec.chosen), (rm, spec.rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise SourceError("the last message must be an assistant turn", field=f, reason="chat_no_assistant")
    p_raw = get_path(data, spec.prompt)
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
                raise missing_field(data, spec.prompt, spec, what="no prompt: no prompt field and no messages "
                                    "before the final assistant turn")
    else:
        prompt = _as_messages(p_raw, spec.prompt, default_role="user")
    if not prompt:
        raise SourceError("prompt has no messages", field=spec.prompt, reason="empty")
    return prompt, cm[-1], rm[-1]


_SANDBOX_ENV: Any = None


class ChatRenderer:
    """Renders message lists to text with a chat template.

    ``template`` is a name of :data:`pairpack.ingest.templates.NAMED_CHAT_TEMPLATES` (``chatml``,
    ``llama3``, ``llama2``, ``mistral``, ``phi3``, ``gemma``, ``zephyr``, ``hh``; see
    :mod:`pairpack.ingest.templates`), a path to a Jinja template file (or to a
    ``tokenizer_config.json`` whose ``chat_template`` is used), or Jinja source. Jinja templates
    see ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` (the
    record's, else None) and any template arguments (``template_args`` for the whole build, then the
    record's ``chat_template_kwargs``), and run in a sandbox (as in ``transformers``:
    ``trim_blocks``, ``lstrip_blocks``).
    """

    def __init__(self, template: str = "chatml", *, bos_token: str = "", eos_token: str = "") -> None:
        self.spec = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.named = NAMED_CHAT_TEMPLATES.get(template)
        self.kind = template if self.named is not None else "jinja"
        self.source = None
        if self.kind == "jinja":
            if "{%" in template or "{{" in template:
                self.source = template
            else:
                p = Path(template)
                try:
                    text = p.read_text(encoding="utf-8")
                except OSError as e:
                    raise ArgumentError(f"{template}: cannot read chat template ({e.strerror or e}); use a "
                                        f"name ({', '.join(NAMED_CHAT_TEMPLATES)}) or a Jinja template file"
                                        ) from None
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
               extra: dict[str, Any] | None = None) -> str:
        """Text of ``messages``; with ``add_generation_prompt`` it ends with the assistant header.
        ``extra``: further template variables (``tools``, template arguments); Jinja only."""
        if extra and self.kind != "jinja":
            if extra.get("tools"):
                raise SourceError(f"the record has tools, which the built-in {self.kind} template cannot render; "
                                  "use the model's own Jinja template (--tokenizer MODEL_DIR or --chat-template FILE)",
                                  field="tools", reason="chat_template")
        if self.named is not None:
            return self.named.render(messages, add_generation_prompt)
        try:
            args = {"tools": None, **(extra or {}), "messages": messages,
                    "add_generation_prompt": add_generation_prompt, "bos_token": self.bos_token,
                    "eos_token": self.eos_token}
            return self._jinja().render(**args)
        except Exception as e:  # noqa: BLE001 - template code can raise anything
            raise SourceError(f"chat template failed: {type(e).__name__}: {str(e)[:200]}",
                              reason="chat_template") from None

    def split(self, prompt: list[dict[str, Any]], final: dict[str, Any], field: str,
              extra: dict[str, Any] | None = None) -> tuple[str, str]:
        """(prompt text ending with the generation prompt, completion text of ``final`` alone).

        The completion is the full rendering minus the prompt rendering; a template for which the
        prompt is not a prefix of the full text is refused (reason "chat_template"; see
        :meth:`split_pair` for the common-prefix split).
        """
        p, full = self._renders(prompt, [final], [field], extra)
        if not full[0].startswith(p) or len(full[0]) == len(p):
            raise SourceError("the chat template's rendering of the prompt (with generation prompt) is not a "
                              "strict prefix of its rendering with the final assistant turn", field=field,
                              reason="chat_template")
        return p, full[0][len(p):]

    def _renders(self, prompt: list[dict[str, Any]], finals: list[dict[str, Any]], fields: list[str],
                 extra: dict[str, Any] | None) -> tuple[str, list[str]]:
        try:
            p = self.render(prompt, True, extra)
        except SourceError as e:
            raise SourceError(e.detail, field=e.field or fields[0], reason=e.reason) from None
        full = []
        for m, f in zip(finals, fields):
            try:
                full.append(self.render(prompt + [m], False, extra))
            except SourceError as e:
                raise SourceError(e.detail, field=e.field or f, reason=e.reason) from None
        return p, full

    def split_pair(self, prompt: list[dict[str, Any]], chosen: dict[str, Any], rejected: dict[str, Any],
                   fields: tuple[str, str], extra: dict[str, Any] | None = None, strict: bool = False
                   ) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, split at the common prefix?).

        When the prompt's rendering (with generation prompt) is a prefix of both conversations'
        renderings, the completions are what follows it. Templates that render earlier turns
        differently once a reply follows (e.g. dropping earlier turns' reasoning, or a generation
        prompt that opens a ``<think>`` block) are split as TRL splits them: the prompt is the
        longest common prefix of the three renderings, and each completion the rest of its
        conversation. ``strict`` refuses them instead (reason "chat_template").
        """
        p, (fc, fr) = self._renders(prompt, [chosen, rejected], list(fields), extra)
        if fc.startswith(p) and fr.startswith(p) and len(fc) > len(p) and len(fr) > len(p):
            return p, fc[len(p):], fr[len(p):], False
        if strict:
            bad = fields[0] if not fc.startswith(p) or len(fc) == len(p) else fields[1]
            raise SourceError("the chat template's rendering of the prompt (with generation prompt) is not a "
                              "strict prefix of its rendering with the final assistant turn (without "
                              "--strict-chat-template such records are split at the common prefix)",
                              field=bad, reason="chat_template")
        cut = min(_common_prefix_len(p, fc), _common_prefix_len(p, fr))
        if cut == 0:
            raise SourceError("the chat template renders the prompt and the conversation with no common prefix",
                              field=fields[0], reason="chat_template")
        c, r = fc[cut:], fr[cut:]
        if not c or not r:
            raise SourceError("the chat template renders no completion after the prompt", reason="chat_template",
                              field=fields[0] if not c else fields[1])
        return p[:cut], c, r, True


# --- shape options, detection, extractors ---------------------------------------------------
@dataclass(frozen=True)
class ShapeOptions:
    """How records are read: shape (None: detect), fields, templates and the HH marker.

    ``chat_template_name`` labels a template given as source (the tokenizer's own);
    ``template_args`` are passed to Jinja chat templates; ``strict_chat_template`` refuses
    templates whose prompt is not a prefix of the conversation (see :meth:`ChatRenderer.split_pair`);
    ``explicit`` holds the roles ("prompt", "chosen", "rejected") whose field names the user gave,
    so that detection never reads past a typo in them; ``why`` says how the shape was decided.
    """

    shape: str | None = None
    spec: FieldSpec = FieldSpec()
    prompt_template: str | None = None
    chat_template: str = "chatml"
    hh_marker: str = HH_MARKER
    chat_template_name: str | None = None
    template_args: tuple[tuple[str, Any], ...] = ()
    strict_chat_template: bool = False
    explicit: frozenset = dc_field(default=frozenset(), compare=False)
    why: str = dc_field(default="", compare=False)
    detected_from: str = dc_field(default="", compare=False)  # the input file whose records fixed the shape

    def __post_init__(self) -> None:
        if self.shape is not None and self.shape not in SHAPES:
            raise ArgumentError(f"unknown shape {self.shape!r}; one of {', '.join(SHAPES)}")
        if self.shape == "template" and not self.prompt_template:
            raise ArgumentError("shape 'template' needs a prompt template (--prompt-template)")
        if self.prompt_template:
            PromptTemplate(self.prompt_template)  # syntax errors surface before any record is read

    def to_json(self) -> dict[str, Any]:
        """The options as recorded in the manifest's provenance (new keys only when set, so that
        datasets built without them keep their manifests)."""
        chat = self.shape == "chat"
        out = {"shape": self.shape, "prompt": self.spec.prompt, "chosen": self.spec.chosen,
               "rejected": self.spec.rejected, "prompt_template": self.prompt_template,
               "chat_template": self.chat_template if chat else None,
               "hh_marker": self.hh_marker if self.shape == "hh" else None}
        if chat and self.chat_template_name:
            out["chat_template_name"] = self.chat_template_name
        if chat and self.template_args:
            out["template_args"] = dict(self.template_args)
        if chat and self.strict_chat_template:
            out["strict_chat_template"] = True
        return out

    def template_label(self) -> str:
        """What the build summary calls the template in use."""
        if self.shape == "chat":
            name = self.chat_template_name or self.chat_template
            return f"chat template {name}" if len(name) < 200 else "chat template (Jinja source)"
        if self.shape == "template":
            return f"prompt template {self.prompt_template!r}"
        if self.shape == "hh":
            return f"HH transcripts split after the last {self.hh_marker!r}"
        return "none (fields as given)"


# Record layouts recognised without flags: (role -> field) and a description for messages.
_OPENAI = {"prompt": "input.messages", "chosen": "preferred_output", "rejected": "non_preferred_output"}


def detect_shape(record: Any, opts: ShapeOptions) -> ShapeOptions | None:
    """The options with ``shape`` (and ``why``) resolved from one record, or None when this record
    says nothing (not an object, or chosen/rejected absent).

    Rules, in order: a forced shape wins; a prompt template means ``template``; an OpenAI
    preference record (``input.messages``, ``preferred_output``, ``non_preferred_output``) means
    ``chat`` with those fields; a ShareGPT record without a prompt field but with
    ``conversations`` means ``chat`` with that prompt; chosen, rejected or prompt holding messages
    means ``chat``; a prompt field means ``fields``; string chosen/rejected with an
    ``instruction`` field means ``template`` with the built-in Alpaca template; other string
    chosen/rejected mean ``hh``. Field names the user gave (``opts.explicit``) are never replaced,
    and a prompt field the user named but the record lacks is an error (a typo must not turn
    the records into HH transcripts).
    """
    if opts.shape is not None:
        return replace(opts, why=opts.why or "--shape")
    if opts.prompt_template:
        return replace(opts, shape="template", why="--prompt-template")
    if not isinstance(record, dict):
        return None
    s = opts.spec
    given = opts.explicit
    if not given & {"chosen", "rejected"} and not _present(get_path(record, s.chosen)) \
            and all(_present(get_path(record, f)) for f in list(_OPENAI.values())[1:]):
        spec = FieldSpec(s.prompt if "prompt" in given else _OPENAI["prompt"], _OPENAI["chosen"], _OPENAI["rejected"])
        return replace(opts, shape="chat", spec=spec,
                       why="OpenAI preference record: " + ", ".join(f"{r} from {getattr(spec, r)!r}" for r in _OPENAI))
    c, r, p = get_path(record, s.chosen), get_path(record, s.rejected), get_path(record, s.prompt)
    if not (_present(c) and _present(r)):
        return None
    if not _present(p) and "prompt" not in given and _is_messages(record.get("conversations")):
        return replace(opts, shape="chat", spec=replace(s, prompt="conversations"),
                       why="ShareGPT record: prompt from 'conversations'")
    if _is_messages(c) or _is_messages(r) or _is_messages(p):
        which = next(f for f, v in ((s.chosen, c), (s.rejected, r), (s.prompt, p)) if _is_messages(v))
        return replace(opts, shape="chat", why=f"field {which!r} holds messages")
    if _present(p):
        return replace(opts, shape="fields", why=f"prompt, chosen and rejected fields ({s.prompt!r})")
    if "prompt" in given:
        raise missing_field(record, s.prompt, s, what="the prompt field given with --prompt is not in the record "
                            "(records without a prompt field would be read as HH transcripts, which --prompt rules out)")
    if isinstance(c, str) and isinstance(r, str):
        if isinstance(record.get("instruction"), str):
            return replace(opts, shape="template", prompt_template="alpaca",
                           why="string chosen/rejected and an 'instruction' field: Alpaca")
        return replace(opts, shape="hh", why=f"string chosen/rejected and no {s.prompt!r} field: HH transcripts")
    return replace(opts, shape="fields", why="chosen and rejected fields")


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
            c, r = get_path(data, s.chosen), get_path(data, s.rejected)
            missing = [f for v, f in ((c, s.chosen), (r, s.rejected)) if not _present(v)]
            if missing:
                raise missing_fields(data, missing, s)
            for v, f in ((c, s.chosen), (r, s.rejected)):
                if not isinstance(v, str):
                    raise SourceError(f"hh transcripts must be strings, got {type(v).__name__}", field=f,
                                      reason="wrong_type")
            try:
                return split_hh(c, r, marker)
            except SourceError as e:
                detail = e.detail
                if e.reason == "hh_no_marker" and opts.why != "--shape":
                    keys = ", ".join(map(str, list(data)[:_KEYS_SHOWN]))
                    detail += (f". The shape hh was detected ({opts.why}); the record's keys are {keys}: if the "
                               "prompt is in another field, pass --prompt NAME (or --shape to force a shape)")
                raise SourceError(detail, field=s.chosen if e.field == "chosen" else s.rejected,
                                  reason=e.reason) from None
        return hh
    if shape == "template":
        tmpl = PromptTemplate(opts.prompt_template or "")

        def templ(data: Any) -> tuple[Segment, Segment, Segment]:
            _require_dict(data)
            need = [f for f in tmpl.required if not _present(get_path(data, f))]
            missing = need + [f for f in (s.chosen, s.rejected) if not _present(get_path(data, f))]
            if missing:
                raise missing_fields(data, missing, s, what="missing field" + (" (used by the prompt template)"
                                                                              if need else ""),
                                     flag=["--prompt-template"] * len(need) + [None] * (len(missing) - len(need)))
            prompt = tmpl.render(data)
            out = []
            for f in (s.chosen, s.rejected):
                v = get_path(data, f)
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
    build_args = dict(opts.template_args)

    def chat(data: Any) -> tuple[Segment, Segment, Segment]:
        prompt, cf, rf = chat_messages(data, s)
        extra = _template_extra(data, build_args)
        p, c, r, cut = renderer.split_pair(prompt, cf, rf, (s.chosen, s.rejected), extra,
                                           opts.strict_chat_template)
        return Segments((p, c, r), CHAT_SPLIT_NOTE) if cut else (p, c, r)
    return chat


# counted by the build: records whose chat template's prompt is not a prefix of the conversation
CHAT_SPLIT_NOTE = "chat_split_at_common_prefix"


class Segments(tuple):
    """(prompt, chosen, rejected) with a ``note`` the build counts (e.g. :data:`CHAT_SPLIT_NOTE`)."""

    note: str | None = None

    def __new__(cls, segs: tuple, note: str | None = None) -> "Segments":
        self = super().__new__(cls, segs)
        self.note = note
        return self


def _template_extra(data: dict[str, Any], build_args: dict[str, Any]) -> dict[str, Any] | None:
    """Jinja variables beyond the messages: the record's ``tools``, the build's template
    arguments, then the record's ``chat_template_kwargs`` (as TRL passes them)."""
    tools = data.get("tools")
    kw = data.get("chat_template_kwargs")
    if tools is None and kw is None and not build_args:
        return None
    out = dict(build_args)
    if kw is not None:
        if not isinstance(kw, dict):
            raise SourceError(f"must be an object of template arguments, got {type(kw).__name__}",
                              field="chat_template_kwargs", reason="wrong_type")
        out.update(kw)
    if isinstance(tools, str):  # some exports store the tool list as JSON text
        try:
            tools = json.loads(tools)
        except ValueError:
            raise SourceError("tools must be a list of tool definitions (or its JSON text)", field="tools",
                              reason="wrong_type") from None
    if tools is not None:
        if not isinstance(tools, list):
            raise SourceError(f"tools must be a list of tool definitions, got {type(tools).__name__}",
                              field="tools", reason="wrong_type")
        out["tools"] = tools or None
    return out

