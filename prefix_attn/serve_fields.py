"""The fields of a ``prefix-attn serve`` request body as OpenAI's API gives them, checked: the
answer other than 200 (:class:`HTTPError`, OpenAI's error object), "stream" and
"stream_options", what a request asks beyond its text (:func:`asked`: "n", "logprobs",
"top_logprobs", "echo"), the forms of a completions "prompt" (:func:`prompts`: a string, an
array of strings, token ids) and the fields refused (:data:`UNSUPPORTED`). Each check raises
an :class:`HTTPError` 400 naming the field (``param``)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from . import jsonl

# request fields asking for what is not served -> the values that ask for nothing (refused otherwise)
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None,), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}  # "response_format" and "tool_choice": prefix_attn.structured
# a request's "seed": taken (and unused) where it decodes without sampling (lm-evaluation-harness
# sends one with every greedy request), refused where it samples
SEED_REFUSED = ("'seed' is not applied per request: the server's --seed draws for every batch in turn "
                 "(a request decoded without sampling may give one: it is not used)")


MAX_LOGPROBS = 5  # /v1/completions' "logprobs": top tokens per position (OpenAI's legacy limit)
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' "top_logprobs" (OpenAI's limit)
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
MAX_CHOICES = 2048  # a request's choices (prompts x "n"), run --batch-size at a time


class HTTPError(Exception):
    """An answer other than 200: its status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": type, "param": param, "code": code}


def stopping_error() -> HTTPError:
    return HTTPError(503, "the server is stopping", type="server_error", code="stopping")


def check_stream(obj: dict) -> None:
    """"stream" is a boolean (or null); "stream_options" (OpenAI's: only with "stream": true)
    an object whose "include_usage" is a boolean."""
    stream, options = obj.get("stream"), obj.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise HTTPError(400, f"'stream' must be true or false, got {json.dumps(stream)}", param="stream")
    if options is None:
        return
    if stream is not True:
        raise HTTPError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not (usage is None or isinstance(usage, bool)):
        raise HTTPError(400, "'stream_options' must be an object whose 'include_usage' is true or false, "
                             f"got {json.dumps(options)}", param="stream_options")


def same(value: Any, fine: Any) -> bool:
    """``value == fine``, a boolean equal to a boolean only: ``"logprobs": 0`` asks for the
    chosen tokens' log probabilities (OpenAI's completions), and ``"n": true`` is no count."""
    return value == fine and isinstance(value, bool) == isinstance(fine, bool)


# generate's words for a request file, and what they are for a client of the API
CLI_HINTS = {"lower --max-new-tokens, or the request's \"max_new_tokens\"": "lower max_tokens"}


def one_line(exc: Exception) -> str:
    """A RequestError's lines (a headline, then one per problem) as one line, in a client's
    words: without generate's ``request:N:`` places (the server's own count of requests) and
    naming the request's fields, not the command's options."""
    text = " ".join(line.strip() for line in str(exc).splitlines())
    text = re.sub(r"\brequest(?::\d+)?: ", "", text)
    for cli, api in CLI_HINTS.items():
        text = text.replace(cli, api)
    return text


@dataclass(frozen=True)
class Asked:
    """What a request asks beyond its text: ``n`` choices, ``logprobs`` (the top tokens given
    at each position; None: no log probabilities), ``echo`` (the prompt before the completion)
    and ``score_only`` (echo with max_tokens 0: the prompt scored, nothing generated)."""

    n: int = 1
    logprobs: Optional[int] = None
    echo: bool = False
    score_only: bool = False


def integer(obj: dict, name: str, low: int, high: int, why: str = "") -> Optional[int]:
    """``obj[name]``, an integer from ``low`` to ``high`` (``1.0`` is 1), or None when null."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
            or not low <= value <= high:
        raise HTTPError(400, f"'{name}' must be an integer from {low} to {high}{why}, got {json.dumps(value)}",
                        param=name)
    return int(value)


def flag(obj: dict, name: str) -> bool:
    value = obj.get(name)
    if value is not None and not isinstance(value, bool):
        raise HTTPError(400, f"'{name}' must be true or false, got {json.dumps(value)}", param=name)
    return value is True


def asked(obj: dict, chat: bool, batch_size: int) -> Asked:
    """The "n", "logprobs", "top_logprobs" and "echo" of a request body, checked as OpenAI's API
    reads them: completions' "logprobs" is a count of top tokens (0 to 5), chat's a flag with
    "top_logprobs" (0 to 20) as the count; "echo" is completions' only."""
    n = integer(obj, "n", 1, batch_size, " (this server's --batch-size)") or 1
    if chat:
        if flag(obj, "echo"):
            raise HTTPError(400, "'echo' is a field of /v1/completions, not of chat completions", param="echo",
                            code="unsupported")
        top = integer(obj, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if not flag(obj, "logprobs"):
            if top:
                raise HTTPError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return Asked(n=n)
        return Asked(n=n, logprobs=top or 0)
    if obj.get("top_logprobs") not in (None, 0) or isinstance(obj.get("top_logprobs"), bool):
        raise HTTPError(400, "'top_logprobs' is chat's: on /v1/completions give 'logprobs': K (the top K tokens)",
                        param="top_logprobs", code="unsupported")
    logprobs = None if obj.get("logprobs") is False else integer(obj, "logprobs", 0, MAX_LOGPROBS)
    echo = flag(obj, "echo")
    score_only = echo and any(same(obj.get(k), 0) for k in MAX_TOKENS_FIELDS)
    return Asked(n=n, logprobs=logprobs, echo=echo, score_only=score_only)


Prompt = Union[str, List[int]]  # a prompt's text, or its token ids

PROMPT_FORMS = "a string, an array of strings, an array of token ids or an array of arrays of token ids"


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompts(value: Any, vocab_size: int) -> List[Prompt]:
    """The prompts of a completions request's "prompt", as OpenAI's API takes it: one string, an
    array of strings, an array of token ids (one prompt) or an array of arrays of token ids. Token
    ids are integers of the model's vocabulary (0 to ``vocab_size`` - 1); no array is empty."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise HTTPError(400, f"'prompt' must be {PROMPT_FORMS}, got {jsonl.json_type(value)}", param="prompt")
    if not value:
        raise HTTPError(400, "'prompt' is an empty array: give at least one prompt", param="prompt")
    first = value[0]
    kind = int if is_id(first) else type(first) if isinstance(first, (str, list)) else None
    alike = is_id if kind is int else (lambda v: isinstance(v, kind))
    bad = 0 if kind is None else next((i for i, v in enumerate(value) if not alike(v)), None)
    if bad is not None:
        held = jsonl.json_type(first) + ("" if kind is None else f" and {jsonl.json_type(value[bad])}")
        raise HTTPError(400, f"'prompt' must be {PROMPT_FORMS}, got an array holding {held} ('prompt'[{bad}])",
                        param="prompt")
    if kind is int:
        return [token_ids(value, "'prompt'", vocab_size)]
    if kind is str:
        return list(value)
    return [token_ids(v, f"'prompt'[{i}]", vocab_size) for i, v in enumerate(value)]


def token_ids(ids: list, where: str, vocab_size: int, param: str = "prompt", empty: bool = False) -> List[int]:
    """``ids``, a prompt's token ids, each an integer from 0 to ``vocab_size`` - 1 (none only
    where ``empty``); ``where``: the field's name in errors, each id named by its index."""
    if not ids and not empty:
        raise HTTPError(400, f"{where} is an empty array of token ids: a prompt needs a token", param=param)
    for j, t in enumerate(ids):
        if not is_id(t):
            raise HTTPError(400, f"{where}[{j}] must be a token id (an integer), got {json.dumps(t)}", param=param)
        if not 0 <= t < vocab_size:
            raise HTTPError(400, f"{where}[{j}]: token id {t} is not in the model's vocabulary (ids 0 to "
                                 f"{vocab_size - 1})", param=param)
    return list(ids)

