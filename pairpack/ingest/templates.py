"""Chat templates by name, for tokenizers that come without one (a bare ``tokenizer.json``).

Each is written from the model family's published chat format (the ``chat_template`` of the
models' own ``tokenizer_config.json``), for the roles pairpack reads (system, user, assistant;
chatml also tool). The prompt ends with the assistant header (the generation prompt), and an
assistant turn ends with the family's end of turn, so a completion is the reply plus that end of
turn. ``markers`` are the special tokens the format relies on: with a tokenizer whose vocabulary
lacks them they would be encoded as plain text, which the build refuses unless asked
(``--markers-as-text``).

========  ==========================================================================================
name      rendering (``{u}`` user, ``{a}`` assistant, ``{s}`` system)
========  ==========================================================================================
chatml    ``<|im_start|>system\\n{s}<|im_end|>\\n<|im_start|>user\\n{u}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n``
llama3    ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{u}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>`` (contents trimmed)
llama2    ``<s>[INST] <<SYS>>\\n{s}\\n<</SYS>>\\n\\n{u} [/INST] {a} </s>`` (contents stripped)
mistral   ``<s>[INST] {s}\\n\\n{u} [/INST]{a}</s>``
phi3      ``<s><|system|>\\n{s}<|end|>\\n<|user|>\\n{u}<|end|>\\n<|assistant|>\\n{a}<|end|>\\n``
gemma     ``<bos><start_of_turn>user\\n{s}\\n\\n{u}<end_of_turn>\\n<start_of_turn>model\\n{a}<end_of_turn>\\n`` (turns trimmed)
zephyr    ``<|system|>\\n{s}</s>\\n<|user|>\\n{u}</s>\\n<|assistant|>\\n{a}</s>\\n``
hh        ``\\n\\nHuman: {u}\\n\\nAssistant: {a}`` (Anthropic HH-RLHF transcripts; plain text)
========  ==========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SourceError

__all__ = ["NamedTemplate", "NAMED_CHAT_TEMPLATES", "families_in_vocabulary"]

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class NamedTemplate:
    """A chat format by name: ``render(messages, add_generation_prompt)`` and the special tokens
    (``markers``) it needs to be tokens of the vocabulary."""

    name: str
    markers: tuple[str, ...]
    render: Callable[[Messages, bool], str]
    roles: tuple[str, ...] = ("system", "user", "assistant")


def _roles(name: str, messages: Messages, allowed: tuple[str, ...]) -> None:
    for i, m in enumerate(messages):
        if m["role"] not in allowed:
            raise SourceError(f"message {i} has role {m['role']!r}, which the {name} template does not render "
                              f"(roles: {', '.join(allowed)}); use the model's own Jinja template "
                              "(--tokenizer MODEL_DIR or --chat-template FILE)", reason="chat_template")


def _system_first(messages: Messages) -> tuple[str | None, Messages]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _chatml(messages: Messages, gen: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if gen else "")


def _llama3(messages: Messages, gen: bool) -> str:
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _llama2(messages: Messages, gen: bool) -> str:
    system, rest = _system_first(messages)
    out = []
    for i, m in enumerate(rest):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"<s>[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} </s>")
    return "".join(out)


def _mistral(messages: Messages, gen: bool) -> str:
    system, rest = _system_first(messages)
    out = ["<s>"]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if i == 0 and system is not None else m["content"]
            out.append(f"[INST] {content} [/INST]")
        else:
            out.append(f"{m['content']}</s>")
    return "".join(out)


def _phi3(messages: Messages, gen: bool) -> str:
    text = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if gen else "")


def _gemma(messages: Messages, gen: bool) -> str:
    system, rest = _system_first(messages)
    out = ["<bos>"]
    for i, m in enumerate(rest):
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        role = "model" if m["role"] == "assistant" else "user"
        out.append(f"<start_of_turn>{role}\n{prefix}{m['content'].strip()}<end_of_turn>\n")
    return "".join(out) + ("<start_of_turn>model\n" if gen else "")


def _zephyr(messages: Messages, gen: bool) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return text + ("<|assistant|>\n" if gen else "")


def _hh(messages: Messages, gen: bool) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
    text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
    return text + ("\n\nAssistant:" if gen else "")


def _checked(t: NamedTemplate) -> NamedTemplate:
    def render(messages: Messages, gen: bool) -> str:
        _roles(t.name, messages, t.roles)
        return t.render(messages, gen)
    return NamedTemplate(t.name, t.markers, render, t.roles)


NAMED_CHAT_TEMPLATES: dict[str, NamedTemplate] = {t.name: _checked(t) for t in (
    NamedTemplate("chatml", ("<|im_start|>", "<|im_end|>"), _chatml, ("system", "user", "assistant", "tool")),
    NamedTemplate("llama3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _llama3),
    NamedTemplate("llama2", ("<s>", "</s>"), _llama2),
    NamedTemplate("mistral", ("<s>", "</s>"), _mistral),
    NamedTemplate("phi3", ("<s>", "<|user|>", "<|assistant|>", "<|end|>"), _phi3),
    NamedTemplate("gemma", ("<bos>", "<start_of_turn>", "<end_of_turn>"), _gemma),
    NamedTemplate("zephyr", ("</s>",), _zephyr),
    NamedTemplate("hh", (), _hh, ("system", "user", "assistant", "tool")),
)}


def families_in_vocabulary(has_token: Callable[[str], bool]) -> list[str]:
    """The named templates whose markers are all tokens of a vocabulary (``has_token``), the
    families with distinctive markers first; hh (plain text) is never listed."""
    return [n for n, t in NAMED_CHAT_TEMPLATES.items() if t.markers and all(has_token(m) for m in t.markers)]
