"""Tool calls parsed out of a chat answer (``--tool-call-parser NAME`` of ``prefix-attn serve`` and
``generate``), as vLLM's tool-call parsers do: the model writes its calls as text in its own
format, and an OpenAI client wants them as ``message.tool_calls``.

A parser applies to a ``--chat`` request giving a non-empty ``"tools"`` whose ``"tool_choice"``
is not ``"none"``. Such a request's answer is decoded with its special tokens kept
(``skip_special_tokens=False``, as vLLM's hermes and mistral parsers ask): Mistral's
``[TOOL_CALLS]`` and Llama 3's ``<|python_tag|>`` are special tokens, and so is Qwen's
``<tool_call>`` in some tokenizers; the stop ids (end of turn) and padding are left out as ever.

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, one call each; the text before the first block is the content; only whitespace may
  come between and after the blocks.
- ``llama3_json`` (Llama 3.1 / 3.2): the whole answer is ``{"name": ..., "parameters": {...}}``
  (or ``"arguments"``), optionally after ``<|python_tag|>``, or several such objects separated
  by ``;``; no content.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name": ..., "arguments": {...}}`` (or one
  such object), or, as Mistral's tokenizer v11+ writes calls (Mistral Small 3.1+, Devstral,
  Magistral), ``[TOOL_CALLS]name[ARGS]{...}`` for each call, one after the other (``[ARGS]``
  absent where decoded without special tokens; v13's ``[CALL_ID]ID`` before it passed over, the
  call's id random as ever); the text before the first ``[TOOL_CALLS]`` is the content.

All or nothing: an answer whose calls do not all parse (malformed JSON, a block not closed
because max_tokens cut it, arguments that are not an object, a name not among the request's
tools) stays content, as a whole, with its finish_reason (vLLM keeps a malformed call as
content too). A parsed answer's content is the text before the calls, trailing whitespace
left out, null when that is empty; its finish_reason is ``"tool_calls"``; each call is OpenAI's
``{"id": "call_<24 hex digits, random>", "type": "function", "function": {"name", "arguments":
JSON text}}``. Imports neither torch nor transformers."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

PARSERS = ("hermes", "llama3_json", "mistral")

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TOKEN = "[TOOL_CALLS]"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Parsed:
    """An answer's tool calls (OpenAI's objects) and the content left (None: none)."""

    content: Optional[str]
    calls: List[dict]
    reason: str = "tool_calls"  # the answer's finish_reason


def need_chat(parser: Optional[str], chat: bool) -> Optional[str]:
    """Why ``--tool-call-parser`` cannot be taken (None: it can): tools come with --chat."""
    if parser is not None and not chat:
        return (f"--tool-call-parser {parser}: tool calls are parsed from chat answers: it needs "
                "--chat (requests' \"tools\" are rendered by the chat template)")
    return None


def applies(parser: Optional[str], request) -> Optional[str]:
    """The parser that reads ``request``'s answer (None: none): ``parser`` (the option) for a
    request giving tools whose ``"tool_choice"`` is ``"auto"`` (or none given): a forced call
    (``"required"``, a named function) is read by :func:`prefix_attn.structured.tool_calls`."""
    constraint = getattr(request, "constraint", None)
    if parser is None or not request.tools or request.extra.get("tool_choice") == "none" or \
            (constraint is not None and constraint.tool):  # a forced call: its own JSON, no parser
        return None
    return parser


def parse(parser: Optional[str], text: str, tools: Optional[List[dict]]) -> Optional[Parsed]:
    """The tool calls of answer ``text`` (decoded with its special tokens) under ``parser``, each
    naming one of ``tools``; None where the answer holds none or any fails to parse (it stays
    content)."""
    if parser is None:
        return None
    found = _FORMATS[parser](text)
    if found is None:
        return None
    content, objects = found
    names = {t.get("function", {}).get("name") for t in tools or [] if isinstance(t.get("function"), dict)}
    calls = [_call(obj, names) for obj in objects]
    if not calls or any(c is None for c in calls):
        return None
    content = content.rstrip()
    return Parsed(content or None, calls)


def _call(obj, names: set) -> Optional[dict]:
    """OpenAI's tool call of one parsed ``{"name", "arguments" | "parameters"}`` object (None: not
    one, or a name not among the tools)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return call(obj["name"], json.dumps(arguments, ensure_ascii=False))


def call(name: str, arguments: str) -> dict:
    """OpenAI's tool call of function ``name`` with ``arguments`` (a JSON text), a random id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _values(text: str, separator: str = "") -> Optional[list]:
    """The JSON values ``text`` holds one after the other (whitespace around them; ``separator``
    between them, if given); None where it holds anything else."""
    values, i = [], 0
    while True:
        i = len(text) - len(text[i:].lstrip())
        if i == len(text):
            return values
        if values and separator:
            if not text.startswith(separator, i):
                return None
            i = len(text) - len(text[i + len(separator):].lstrip())
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _hermes(text: str) -> Optional[Tuple[str, list]]:
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return None
    objects, rest = [], text[start:]
    while rest.strip():
        rest = rest.lstrip()
        end = rest.find(_HERMES_CLOSE)
        if not rest.startswith(_HERMES_OPEN) or end < 0:
            return None
        body = _values(rest[len(_HERMES_OPEN):end])
        if body is None or len(body) != 1:
            return None
        objects.append(body[0])
        rest = rest[end + len(_HERMES_CLOSE):]
    return text[:start], objects


def _llama3_json(text: str) -> Optional[Tuple[str, list]]:
    body = text.strip()
    body = body[len(_PYTHON_TAG):] if body.startswith(_PYTHON_TAG) else body
    if not body.lstrip().startswith("{"):
        return None
    objects = _values(body, ";")
    return None if objects is None else ("", objects)


def _mistral(text: str) -> Optional[Tuple[str, list]]:
    start = text.find(_MISTRAL_TOKEN)
    if start < 0:
        return None
    body = text[start + len(_MISTRAL_TOKEN):]
    if body.lstrip()[:1] not in ("[", "{"):  # tokenizer v11+: name[ARGS]{...}, each call its own
        objects = _mistral_named(body)
        return None if objects is None else (text[:start], objects)
    values = _values(body)
    if values is None or len(values) != 1:
        return None
    objects = values[0] if isinstance(values[0], list) else [values[0]]
    return text[:start], objects


_MISTRAL_NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?(?:\[ARGS\])?")


def _mistral_named(body: str) -> Optional[list]:
    """The calls of Mistral's tokenizer v11+ format after its first ``[TOOL_CALLS]``: each a
    function name, ``[ARGS]`` (a special token: absent from a text decoded without them) and
    its arguments, one JSON object; ``[CALL_ID]ID`` (v13) between them is passed over; the calls
    one after the other, each after its own ``[TOOL_CALLS]``; whitespace around them. None where
    the text holds anything else."""
    objects, i = [], 0
    while True:
        found = _MISTRAL_NAME.match(body, i)
        if found is None:
            return None
        try:
            arguments, i = _DECODER.raw_decode(body, found.end())
        except ValueError:
            return None
        objects.append({"name": found.group(1), "arguments": arguments})
        rest = body[i:].lstrip()
        if not rest:
            return objects
        if not rest.startswith(_MISTRAL_TOKEN):
            return None
        i = len(body) - len(rest) + len(_MISTRAL_TOKEN)


_FORMATS = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}


# -- streaming -------------------------------------------------------------------------------

def _held_from(parser: str, text: str) -> int:
    """Where the part of ``text`` (a streamed answer so far) that may still be tool calls begins
    (``len(text)``: none may), trailing whitespace included (left out of a parsed content)."""
    if parser == "llama3_json":
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(head):
            return 0
        return len(text)
    marker = _HERMES_OPEN if parser == "hermes" else _MISTRAL_TOKEN
    i = text.find(marker)
    if i < 0:  # a tail that may become the marker
        i = next((k for k in range(max(len(text) - len(marker) + 1, 0), len(text))
                  if marker.startswith(text[k:])), len(text))
    return len(text[:i].rstrip())


def holder(parser: Optional[str]) -> Callable[[str], str]:
    """For a streamed answer: a function of each stable piece of text to the part that can go
    out now as content (all of it without a parser). Under a parser it holds back what may be
    the start of tool calls (the marker, or a tail that may become it; for llama3_json an answer
    beginning with ``{`` or ``<|python_tag|>``) and the whitespace before it: that text goes out
    when the answer ends, as tool calls or, where none parse, as content."""
    if parser is None:
        return lambda piece: piece
    seen, sent = [""], [""]

    def take(piece: str) -> str:
        seen[0] += piece
        ready = seen[0][:_held_from(parser, seen[0])]
        if len(ready) <= len(sent[0]):
            return ""
        out, sent[0] = ready[len(sent[0]):], ready
        return out
    return take

