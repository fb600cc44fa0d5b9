"""Structured outputs, as vLLM serves them: a request's answer constrained by a grammar so that
its text is JSON of a given shape. What asks for one (checked by :func:`of`):

- ``"response_format": {"type": "json_object"}``: any JSON object;
- ``"response_format": {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``:
  a JSON value matching ``schema`` (a JSON schema object; ``"strict"`` true, false or null is
  taken: the grammar always holds);
- ``"tool_choice": {"type": "function", "function": {"name": X}}`` (with ``"tools"``): a JSON
  object of function X's ``"parameters"`` schema, answered as one call of X whose
  ``"arguments"`` are the generated text (:func:`tool_calls`);
- ``"tool_choice": "required"``: a JSON array of one or more ``{"name": one of the tools,
  "parameters": its schema}`` objects (one only with ``"parallel_tool_calls": false``),
  answered as those calls.

``"response_format": {"type": "text"}``, ``"tool_choice"`` ``"auto"`` or ``"none"`` (and null)
ask for nothing. The grammar is xgrammar's JSON without free whitespace (", " and ": " its separators, no
other whitespace between tokens), compiled
from the schema (:mod:`prefix_attn.structured_logits` applies it while generating). xgrammar is
an optional dependency (``pip install 'prefix_attn[structured]'``), imported only when a request
asks for a constraint. Imports neither torch nor xgrammar."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import List, Optional

INSTALL = "pip install xgrammar (or pip install 'prefix_attn[structured]')"
ANY_WHITESPACE = False  # no free whitespace: a model cannot spend its tokens on whitespace
_KINDS = ("text", "json_object", "json_schema")


class ConstraintError(ValueError):
    """A request field asking for a constraint that cannot be served; ``param``: the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must be: JSON matching ``schema`` (a JSON schema's text);
    ``kind`` the field that asked: "json_object", "json_schema", "function" (a named
    tool_choice, ``name`` the function's) or "required" (tool_choice "required")."""

    kind: str
    schema: str
    name: Optional[str] = None

    @property
    def tool(self) -> bool:
        """Whether the answer is tool calls (:func:`tool_calls`), not content."""
        return self.kind in ("function", "required")


def of(obj: dict, tools: Optional[List[dict]]) -> Optional[Constraint]:
    """The constraint request ``obj`` asks for (None: none), its schema checked (xgrammar
    compiles it); ``tools``: its parsed "tools". Raises ConstraintError naming the field."""
    constraint = _response_format(obj.get("response_format"))
    forced = _tool_choice(obj.get("tool_choice"), tools, _parallel(obj.get("parallel_tool_calls")))
    if constraint is not None and forced is not None:
        raise ConstraintError("give 'response_format' or a 'tool_choice' forcing a call, not both", "tool_choice")
    constraint = constraint or forced
    if constraint is not None:
        param = "tools" if constraint.tool else "response_format"
        problem = _schema_problem(_xgrammar(param), constraint.schema)
        if problem is not None:
            raise ConstraintError(f"'{param}': the schema is not one xgrammar can compile: {problem}", param)
    return constraint


def _response_format(value) -> Optional[Constraint]:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _KINDS:
        raise ConstraintError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                              "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}, got "
                              f"{json.dumps(value)[:200]}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", json.dumps({"type": "object"}))
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
        raise ConstraintError("'response_format'.'json_schema' must be an object with a 'name' (a string) and a "
                              f"'schema' (a JSON schema object), got {json.dumps(spec)[:200]}", "response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ConstraintError("'response_format'.'json_schema'.'strict' must be true or false, got "
                              f"{json.dumps(spec['strict'])}", "response_format")
    return Constraint("json_schema", json.dumps(spec["schema"]))


def _functions(tools: Optional[List[dict]]) -> dict:
    """The request's functions: name -> "parameters" schema (an empty object where none)."""
    found = {}
    for tool in tools or []:
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            found[function["name"]] = parameters if isinstance(parameters, dict) else {"type": "object"}
    return found


def _parallel(value) -> bool:
    """A request's "parallel_tool_calls" (OpenAI's; default true): false allows one call."""
    if value is not None and not isinstance(value, bool):
        raise ConstraintError(f"'parallel_tool_calls' must be true or false, got {json.dumps(value)}",
                              "parallel_tool_calls")
    return value is not False


def _tool_choice(value, tools: Optional[List[dict]], parallel: bool = True) -> Optional[Constraint]:
    if value is None or value in ("auto", "none"):
        return None
    named = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if value != "required" and not (isinstance(named, dict) and isinstance(named.get("name"), str)):
        raise ConstraintError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                              f"\"function\": {{\"name\": ...}}}}, got {json.dumps(value)[:200]}", "tool_choice")
    functions = _functions(tools)
    if not functions:
        raise ConstraintError(f"'tool_choice' {json.dumps(value)} needs 'tools' naming at least one function",
                              "tool_choice")
    if value == "required":
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **({} if parallel else {"maxItems": 1})}
        return Constraint("required", json.dumps(schema))
    name = named["name"]
    if name not in functions:
        raise ConstraintError(f"'tool_choice' names the function {name!r}, which is not among 'tools' (known: "
                              f"{', '.join(functions)})", "tool_choice")
    return Constraint("function", json.dumps(functions[name]), name)


def _xgrammar(param: str):
    """The xgrammar module; ConstraintError naming ``param`` and the install command without it."""
    try:
        import xgrammar
    except ImportError:
        raise ConstraintError(f"'{param}' asks for structured output, which needs the xgrammar package, not "
                              f"installed here: {INSTALL}", param) from None
    return xgrammar


@functools.lru_cache(maxsize=256)
def _schema_problem(xgr, schema: str) -> Optional[str]:
    """What xgrammar says of ``schema`` (a JSON schema's text), its log prefix left out; None:
    it converts to a grammar."""
    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=ANY_WHITESPACE)
    except Exception as exc:  # xgrammar raises RuntimeError, ValueError, ... with its C++ place
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return None


def tool_calls(constraint: Constraint, text: str) -> Optional[List[dict]]:
    """The tool calls of a constrained answer ``text`` (OpenAI's objects; a named function's
    "arguments" the text as generated, as vLLM gives them); None where the text is not the whole
    JSON (max_tokens cut it) or ``constraint`` asks for content."""
    from .tool_calls import call

    if not constraint.tool:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if constraint.kind == "function":
        return [call(constraint.name, text)] if isinstance(value, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, dict) and "name" in v for v in value):
        return None
    return [call(v["name"], json.dumps(v.get("parameters", {}), ensure_ascii=False)) for v in value]
