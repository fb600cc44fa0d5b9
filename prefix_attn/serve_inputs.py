"""What ``prefix-attn generate`` checks before it loads a model: the request file
(:func:`read_requests`: JSON lines, ``file:line`` in every error, unique ids, each request's
decoding fields checked as the command's options are: :mod:`prefix_attn.serve_options`) and the prefix
sources (``--bank``, ``--adapter``, ``--prompt-prefix``: one source per name, every request's
prefix known, adapters trained on another base model). Several bad lines are named in one
:class:`RequestError`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import cli_args, jsonl, serve_options

_MAX_LISTED = 10  # bad request lines named in one error; the rest are counted


class RequestError(ValueError):
    """A bad request file or request (names the file and line); ``param``: the request field at
    fault, where one is (the server's error names it)."""

    param = None


@dataclass
class Request:
    """One line of the request file: its ``prompt``, or its ``messages`` (then ``prompt`` is None),
    its ``tools``, the chat template's function schemas, and how its rendering ends (the generation
prompt, or the last message continued: :func:`prefix_attn.chat.parse_ending`) (all ``prefix-attn
generate --chat``);
    ``options``: the decoding settings its fields give (argparse dest -> value,
    :func:`prefix_attn.serve_options.parse_fields`), which override the command's options;
    ``ids``: the prompt given as token ids (``prefix-attn serve``'s "prompt" of token ids), run
    as given, no start token added (``prompt`` then their text, decoded once the model has them);
    ``constraint``: the structured output its "response_format" or "tool_choice" asks for
    (:mod:`prefix_attn.structured`; None: free text)."""

    prompt: Optional[str]
    prefix: Optional[str] = None
    id: Any = None
    line: int = 0
    extra: dict = field(default_factory=dict)
    messages: Optional[List[dict]] = None
    tools: Optional[List[dict]] = None
    options: Dict[str, Any] = field(default_factory=dict)
    generation_prompt: bool = True  # "add_generation_prompt" (--chat)
    continue_final: bool = False  # "continue_final_message" (--chat)
    ids: Optional[List[int]] = None
    constraint: Optional[Any] = None  # structured.Constraint


# -- request file ----------------------------------------------------------------------------

def read_requests(path: str) -> List[Request]:
    """Parse a JSONL request file (``-`` = stdin). A request without ``id`` gets its line
    number. Raises RequestError naming ``path:line``; bad decoding fields of every line in one."""
    lines = jsonl.read_lines(path, RequestError, what="requests file")
    requests: List[Request] = []
    id_lines: Dict[str, int] = {}  # the id as JSON -> line of its first use
    bad: List[str] = []
    for lineno, obj in jsonl.json_values(path, lines, RequestError, finite=True):
        request = _parse_request(obj, f"{path}:{lineno}", lineno)
        _check_unique_id(request, id_lines, f"{path}:{lineno}")
        request.options, problems = serve_options.parse_fields(obj, f"{path}:{lineno}")
        bad += problems
        requests.append(request)
    if bad:
        raise refusal(f"{len(bad)} bad decoding field(s) (each takes what the command's option of "
                      "the same name takes):", bad)
    return requests


def request_of(obj, where: str, number: int) -> Request:
    """One request object (``prefix-attn serve``'s body, as a line of the request file reads):
    ``number`` is its ``line``. Raises RequestError naming ``where``, every bad decoding field
    in one."""
    request = _parse_request(obj, where, number)
    request.options, problems = serve_options.parse_fields(obj, where)
    if problems:
        raise refusal(f"{len(problems)} bad decoding field(s):", problems)
    return request


def _parse_request(obj, where: str, lineno: int) -> Request:
    if not isinstance(obj, dict):
        raise RequestError(f"{where}: expected a JSON object, got {jsonl.json_type(obj)}"
                           + jsonl.array_hint(where, obj))
    messages = None
    generation_prompt, continue_final = True, False
    if "continue_final_message" in obj or "add_generation_prompt" in obj:  # for --chat
        from .chat import parse_ending

        generation_prompt, continue_final = parse_ending(obj, where)
    if "messages" in obj:  # a conversation, for --chat
        from .chat import parse_messages

        if "prompt" in obj:
            raise RequestError(f"{where}: give 'prompt' or 'messages', not both")
        messages = parse_messages(obj["messages"], where, continue_final)
    elif continue_final:
        raise RequestError(f"{where}: \"continue_final_message\": true needs 'messages' ending with an "
                           "assistant message to continue ('prompt' is a user message)")
    elif "prompt" not in obj:
        found = ", ".join(repr(k) for k in obj) or "none"
        raise RequestError(f"{where}: missing 'prompt' (fields found: {found})")
    tools = None
    if "tools" in obj:  # function schemas, for --chat (also echoed in the result)
        from .chat import parse_tools

        tools = parse_tools(obj["tools"], where)
    prompt = obj.get("prompt")
    if messages is None and not isinstance(prompt, str):
        raise RequestError(f"{where}: 'prompt' must be a string, got {jsonl.json_type(prompt)}")
    prefix = obj.get("prefix")
    if prefix == "":
        prefix = None
    if prefix is not None and not isinstance(prefix, str):
        raise RequestError(f"{where}: 'prefix' must be a name (string) or null, got {prefix!r}")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "prefix", "id")}
    return Request(prompt=prompt, prefix=prefix, id=obj.get("id", lineno), line=lineno, extra=extra,
                   messages=messages, tools=tools, generation_prompt=generation_prompt,
                   continue_final=continue_final, constraint=_constraint(obj, tools, where, messages is not None))


def _constraint(obj: dict, tools: Optional[List[dict]], where: str, chat: bool):
    """The structured output ``obj`` asks for (None: none); a RequestError naming the field.
    ``chat``: a conversation ("messages"), the only request whose answer can be tool calls."""
    if obj.get("response_format") is None and obj.get("tool_choice") is None:
        return None  # structured is not imported: nothing asks for it
    from . import structured

    try:
        constraint = structured.of(obj, tools)
        if constraint is not None and constraint.tool and not chat:
            raise structured.ConstraintError(
                "a 'tool_choice' forcing a call needs a conversation ('messages', with --chat): "
                "a 'prompt' is answered as text, never as tool calls", "tool_choice")
        return constraint
    except structured.ConstraintError as exc:
        error = RequestError(f"{where}: {exc}")
        error.param = exc.param
        raise error from None


def _check_unique_id(request: Request, id_lines: Dict[str, int], where: str) -> None:
    key = json.dumps(request.id, sort_keys=True)
    first = id_lines.setdefault(key, request.line)
    if first != request.line:
        raise RequestError(f"{where}: duplicate id {request.id!r}, already used by line {first} "
                           "(a request without an 'id' has its line number as id)")


def refusal(headline: str, problems: List[str]) -> RequestError:
    """One error listing up to ``_MAX_LISTED`` problems (one a line), then how many more."""
    lines = [headline] + [f"  {p}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  and {len(problems) - _MAX_LISTED} more")
    return RequestError("\n".join(lines))


# -- prefix sources --------------------------------------------------------------------------

def _name_value(spec: str, option: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if sep and name and not value:
        what = "text" if option == "--prompt-prefix" else "value"
        raise RequestError(f"{option} {spec!r}: the {what} after {name}= is empty")
    if not sep or not name:
        form = {"--adapter": "NAME=DIR, e.g. --adapter support=out/adapter",
                "--prompt-prefix": "NAME=TEXT, e.g. --prompt-prefix sys='You are terse.'"}
        raise RequestError(f"{option} expects {form.get(option, 'NAME=VALUE')}, got {spec!r}")
    problem = cli_args.not_utf8(value) if option == "--prompt-prefix" else None
    if problem is not None:
        raise RequestError(f"{option} {name}: the text {problem}")
    return name, value


def warn(message: str, command: str = "generate") -> None:
    print(f"prefix-attn {command}: warning: {message}", file=sys.stderr)


@dataclass
class Source:
    """Where one prefix name comes from: ``--bank DIR``, ``--adapter DIR`` or ``--prompt-prefix TEXT``."""

    name: str
    option: str
    value: str

    def __str__(self) -> str:
        value = self.value if self.option != "--prompt-prefix" else repr(_shorten(self.value))
        return f"{self.option} {value}"


def _shorten(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def prefix_sources(args: argparse.Namespace) -> List[Source]:
    """Every prefix name with its source, in loading order; a name given twice is an error."""
    sources = [Source(n, "--bank", args.bank) for n in _saved_bank_names(args.bank)] if args.bank else []
    sources += [Source(n, "--adapter", d) for n, d in (_name_value(s, "--adapter") for s in args.adapter)]
    sources += [Source(n, "--prompt-prefix", t)
                for n, t in (_name_value(s, "--prompt-prefix") for s in args.prompt_prefix)]
    seen: Dict[str, Source] = {}
    for s in sources:
        if s.name in seen:
            raise RequestError(f"prefix name {s.name!r} given twice ({seen[s.name]}, {s})")
        seen[s.name] = s
    return sources


def _saved_bank_names(directory: str) -> List[str]:
    """The entry names of a bank saved in ``directory`` (read from the file's header only)."""
    from prefix_attn import bank_file

    try:
        return bank_file.read(directory, tensors=False).names
    except (FileNotFoundError, ValueError) as exc:
        raise RequestError(str(exc)) from None


def check_prefix_names(requests: List[Request], known: List[str], path: str) -> None:
    """Every request's prefix is a known name (all bad lines named in one error)."""
    names = set(known)
    from prefix_attn.bank import did_you_mean, some_names

    bad = [f"{path}:{r.line}: unknown prefix {r.prefix!r}{did_you_mean(r.prefix, known)}"
           for r in requests if r.prefix is not None and r.prefix not in names]
    if bad and not known:
        raise refusal(f"{len(bad)} request(s) name a prefix, but no prefix was given: serve them with "
                      "--adapter NAME=DIR, --prompt-prefix NAME=TEXT or --bank DIR", bad)
    if bad:
        raise refusal(f"{len(bad)} request(s) name an unknown prefix; known prefixes: {some_names(known)}", bad)


def _adapter_field(directory: str, key: str):
    """Field ``key`` of an adapter's ``adapter_config.json`` (None where it does not read:
    load_peft reports a broken adapter)."""
    try:
        with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _adapter_base(directory: str) -> Optional[str]:
    """The local base-model folder an adapter records (``base_model_name_or_path``), if it exists."""
    base = _adapter_field(directory, "base_model_name_or_path")
    return base if isinstance(base, str) and base and os.path.isdir(base) else None


def adapter_length(directory: str) -> Optional[int]:
    """The prefix length (``num_virtual_tokens``) an adapter records; None where it names none."""
    P = _adapter_field(directory, "num_virtual_tokens")
    return P if isinstance(P, int) and not isinstance(P, bool) and P >= 0 else None


# request fields that look like generation options but are not applied per request, which
# generate takes only as command options (serve_options.FIELDS are applied). A seed: one torch
# generator draws for every batch in turn, so a request's own seed could not hold in a batch
# shared with others (nor its answer stay the same when the others change)
_OPTION_FIELDS = {"seed": "--seed"}


def warn_about_option_fields(requests: List[Request]) -> None:
    """One warning naming the request fields that look like generation options and are not
    applied per request (only copied to the results, as every unknown field is)."""
    found = sorted({k for r in requests for k in r.extra if k in _OPTION_FIELDS})
    if found:
        options = sorted({_OPTION_FIELDS[k] for k in found})
        fields = f"field{'s' if len(found) > 1 else ''} {', '.join(found)}"
        warn(f"request {fields}: not applied per request (the command's {', '.join(options)} "
             f"{'apply' if len(options) > 1 else 'applies'} to every request); copied to the "
             f"results unchanged")


# the sampling options and their defaults, which greedy decoding and beam search do not use
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def warn_about_sampling_options(args: argparse.Namespace, requests: List[Request], path: str,
                                command: str = "generate") -> None:
    """One warning naming the sampling options set away from their defaults without
    ``--do-sample`` when no request samples (``"do_sample": true``): the answers are greedy (or
    beam search) and do not use them; one naming the requests whose sampling fields go unused
    for the same reason. ``command``: the command saying it."""
    _warn_about_sampling_fields(args, requests, path)
    if args.do_sample or any(r.options.get("do_sample") for r in requests):
        return
    given = [f"--{k.replace('_', '-')}" for k, default in _SAMPLING_DEFAULTS.items() if getattr(args, k) != default]
    if given:
        warn(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} with --do-sample only: "
             f"without it decoding is greedy{' (beam search)' if args.num_beams > 1 else ''} and "
             f"{'they are' if len(given) > 1 else 'it is'} not used", command)


def _warn_about_sampling_fields(args: argparse.Namespace, requests: List[Request], path: str) -> None:
    unused = [(r, serve_options.unused_sampling_fields(r.options, args)) for r in requests]
    unused = [(r, names) for r, names in unused if names]
    if not unused:
        return
    names = sorted({n for _, found in unused for n in found})
    lines = ", ".join(f"{path}:{r.line}" for r, _ in unused[:_MAX_LISTED])
    more = f" and {len(unused) - _MAX_LISTED} more" if len(unused) > _MAX_LISTED else ""
    warn(f"request field{'s' if len(names) > 1 else ''} {', '.join(names)} "
         f"{'apply' if len(names) > 1 else 'applies'} with do_sample only: not used by {lines}{more}, "
         f"which decode{'s' if len(unused) == 1 else ''} without sampling (do_sample false: the request's "
         "field, else the command's --do-sample)")


def warn_about_adapter_bases(sources: List[Source], model_dir: Optional[str], command: str = "generate") -> None:
    """Warn where an adapter was trained on a local model folder other than the one served."""
    for s in sources:
        base = _adapter_base(s.value) if s.option == "--adapter" else None
        if base is None:
            continue
        if model_dir is None:
            warn(f"adapter {s.name} was trained on {base}; pass --model {base} "
                 "(without --model the built-in tiny model is used)", command)
        elif not (os.path.isdir(model_dir) and os.path.samefile(model_dir, base)):
            warn(f"adapter {s.name} was trained on {base}, not on --model {model_dir}", command)
