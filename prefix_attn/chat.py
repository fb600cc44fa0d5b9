"""``prefix-attn generate --chat``: requests rendered with the tokenizer's chat template.

- A ``--prompt-prefix NAME=TEXT`` is a system message: its bank entry holds the KV of the
  template rendered for ``[system]`` alone (no generation prompt), less a last end-of-sequence
  token (Phi-3's template ends any conversation rendered without the generation prompt so).
- A request after it is the template rendered for ``[system, user(prompt)]`` (or ``[system,
  *messages]``) with the generation prompt, less the system part's tokens. Those must be the
  first tokens of the whole conversation, else the entry's KV is not the conversation's: a
  template that renders the system message differently once a user turn follows (one that
  folds it into the first user turn, or whose tokens merge across the boundary) is refused,
  naming the prefix, never served with wrong continuations; so is one that renders
  ``[system]`` alone as the same tokens whatever its text (only its BOS, say: Gemma 3 and
  Mistral v0.3 write the system message into a user turn), whose entry would hold none of it.
- A request with an adapter (trained) prefix or none is the template rendered for
  ``[user(prompt)]`` (or its ``messages``) with the generation prompt: the template's own
  default system prompt, if it has one, included.

Each request's tokens are thus exactly those of ``tokenizer.apply_chat_template(conversation,
tools=tools, add_generation_prompt=True)`` on its whole conversation, the prompt prefix's tokens
included; ``tools``: the request's ``"tools"`` (function schemas), if any. Templates usually
write them into the system part: a request giving tools after a prompt prefix is then refused
as above. Assistant messages may be tool calls (``content`` null, ``tool_calls``), whose
arguments (an object, or OpenAI's JSON text of one) go to the template in the form it writes,
found once by rendering a call (:attr:`ChatTemplate.arguments_form`): the text as its object for a
template writing objects with ``tojson`` (Qwen, Hermes, Llama 3.1, Mistral; the text would be
written as a JSON string, encoded twice), an object as its JSON text for one concatenating the
text (DeepSeek-V3), else as given. The request itself is left as given (its echo keeps the text).

A request with ``"continue_final_message": true`` (vLLM's field, :func:`parse_ending`) ends with
an assistant message, the start of the answer, and its tokens are instead
``apply_chat_template(conversation, tools=tools, add_generation_prompt=False,
continue_final_message=True)``: the rendering ends inside that message, which the answer
continues (its text is only what is generated). transformers refuses a template that does not
write the message's text at the end (one stripping or rewriting it, e.g. a think block it
drops); a template that writes the conversation before it otherwise than it opens a new answer
with the generation prompt (DeepSeek-R1's opens a ``<think>`` block that an assistant message
lacks; Mistral v0.3 drops the system message once an answer follows) is refused too, compared
as text: such a continuation would follow a conversation the model is not otherwise served.
"""
from __future__ import annotations

import json
from functools import cached_property
from typing import Dict, List, Optional, Tuple

from . import jsonl
from .tiny import _first_line
from .serve_inputs import Request, RequestError, refusal

ROLES = ("system", "user", "assistant", "tool")
_SHOWN = 8  # tokens shown from the first difference
# [system] rendered with other texts, to tell whether the text is in it
_OTHER_SYSTEMS = ("Another system prompt.", "A different one, longer: 42!")


# -- the request file's "messages" -----------------------------------------------------------

def parse_messages(value, where: str, continue_final: bool = False) -> List[dict]:
    """A request's ``"messages"``: a non-empty array of ``{"role", "content"}`` objects (other
    keys, e.g. a tool message's ``tool_call_id``, are passed to the template as they are; an
    assistant message with ``tool_calls``, an array of objects, may have no content or null);
    a system message only first; the last one a user (or tool) message, which the answer
    follows, or with ``continue_final`` (``"continue_final_message": true``) an assistant
    message of non-empty text, which the answer continues. OpenAI's other forms are taken
    (:func:`_openai_forms`). Raises RequestError naming ``where``."""
    value = _openai_forms(value, where)
    _check_messages(value, where)
    last = value[-1]
    if continue_final:
        _check_continued(last, f"{where}: messages[{len(value) - 1}]")
    elif last["role"] not in ("user", "tool"):
        hint = (" (the answer is generated as a new assistant turn after it); to continue an "
                "assistant message instead, give \"continue_final_message\": true"
                if last["role"] == "assistant" else
                " (the answer is generated as a new assistant turn after it)")
        raise RequestError(f"{where}: the last message's role is {last['role']!r}: end with a "
                           f"user message{hint}")
    return value


def _check_continued(message: dict, at: str) -> None:
    """The last message of a request continuing it: an assistant message with text to continue
    (not a tool call: its rendering is the template's, no text the answer could go on from)."""
    if message["role"] != "assistant":
        raise RequestError(f"{at}: \"continue_final_message\": true continues the last message, which must "
                           f"be an assistant message (the start of the answer); its role is {message['role']!r}")
    if message.get("tool_calls"):
        raise RequestError(f"{at}: \"continue_final_message\": true cannot continue a tool call "
                           "('tool_calls'): give the start of the answer as 'content'")
    if not message["content"].strip():
        raise RequestError(f"{at}: \"continue_final_message\": true needs the assistant message's 'content' "
                           "to hold text (the start of the answer); to start a new assistant turn, leave the "
                           "message out and \"continue_final_message\" unset")


# the request fields saying how a conversation's rendering ends, apply_chat_template's arguments
ENDING_FIELDS = ("continue_final_message", "add_generation_prompt")


def parse_ending(obj: dict, where: str) -> Tuple[bool, bool]:
    """(generation prompt, continue the final message) of a request ``obj``, as vLLM takes its
    fields: ``"add_generation_prompt"`` (default true: the answer is a new assistant turn) and
    ``"continue_final_message"`` (default false; true: the rendering ends inside the last
    message, an assistant's, which the answer continues, as ``apply_chat_template(...,
    continue_final_message=True)`` renders it). Null is the default. Both true is an error (as
    transformers raises); ``"continue_final_message": true`` alone turns the generation prompt
    off (vLLM wants ``"add_generation_prompt": false`` said too). Raises RequestError naming
    ``where``."""
    values = {}
    for name in ENDING_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{where}: {name!r} must be true or false, got {jsonl.json_type(value)}")
        values[name] = value
    continue_final = values["continue_final_message"] is True
    generation_prompt = values["add_generation_prompt"]
    if continue_final and generation_prompt:
        raise RequestError(f"{where}: 'continue_final_message' and 'add_generation_prompt' are both true: "
                           "the answer either continues the last (assistant) message or starts a new "
                           "assistant turn; give \"add_generation_prompt\": false (or leave it out)")
    return (not continue_final if generation_prompt is None else generation_prompt), continue_final


def parse_example_messages(value, where: str) -> List[dict]:
    """A training example's ``"messages"`` (``prefix-attn train --chat``): a request's messages
    (:func:`parse_messages`) then one assistant message, the answer learnt. Raises
    RequestError naming ``where``."""
    value = _openai_forms(value, where)
    _check_messages(value, where)
    last = value[-1]["role"]
    if last != "assistant":
        raise RequestError(f"{where}: the last message's role is {last!r}: end with the assistant "
                           "message to learn (the messages before it are its context)")
    before = value[-2]["role"] if len(value) > 1 else None
    if before not in ("user", "tool"):
        got = "it is the only message" if before is None else f"it follows a {before!r} message"
        raise RequestError(f"{where}: the last (assistant) message must follow a user or tool message, "
                           f"as an answer of generate --chat does; {got}")
    return value


def _openai_forms(value, where: str):
    """``value`` with OpenAI's other forms of a message made the plain ones the chat templates
    read: the role ``"developer"`` (OpenAI's name of the system message for its newer models) is
    ``"system"``; a ``"content"`` given as an array of text parts, ``[{"type": "text", "text":
    "..."}, ...]`` (what many OpenAI clients send), is their texts joined with newlines, as vLLM
    joins them. A part of another type (an image, audio) is refused: only text is served.
    Anything else is left to :func:`_check_messages`."""
    if not isinstance(value, list):
        return value
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict):
            m = dict(m)
            if m.get("role") == "developer":
                m["role"] = "system"
            if isinstance(m.get("content"), list):
                m["content"] = _text_parts(m["content"], f"{where}: messages[{i}]")
        out.append(m)
    return out


def _text_parts(parts: list, at: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = f"type {part.get('type')!r}" if isinstance(part, dict) else jsonl.json_type(part)
            raise RequestError(f"{at}: content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                               f"\"...\"}}) are served, got {kind}")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_messages(value, where: str) -> None:
    """The form of a ``"messages"`` array, whatever its last message."""
    form = '[{"role": "user", "content": "..."}, ...]'
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else jsonl.json_type(value)
        raise RequestError(f"{where}: 'messages' must be a non-empty array of messages, {form}; got {got}")
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{at}: expected an object {{\"role\": ..., \"content\": ...}}, "
                               f"got {jsonl.json_type(m)}")
        if m.get("role") not in ROLES:
            got = f"{m['role']!r}" if "role" in m else "none"
            raise RequestError(f"{at}: 'role' must be one of {', '.join(map(repr, ROLES))}; got {got}")
        calls = _tool_calls(m, at)
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            got = jsonl.json_type(m["content"]) if "content" in m else "none"
            calls_hint = " (null or left out only with a non-empty 'tool_calls')" if m["role"] == "assistant" else ""
            raise RequestError(f"{at}: 'content' must be a string; got {got}{calls_hint}")
        if m["role"] == "system" and i > 0:
            raise RequestError(f"{at}: a system message may only come first")


def _tool_calls(message: dict, at: str) -> list:
    """An assistant message's ``tool_calls`` (OpenAI's form; their arguments go to the template
    in the form it writes, :attr:`ChatTemplate.arguments_form`): an array of objects; [] when
    it has none."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if message["role"] != "assistant":
        raise RequestError(f"{at}: 'tool_calls' only on an assistant message, not on a {message['role']!r} one")
    got = _not_objects(calls)
    if got is not None:
        raise RequestError(f"{at}: 'tool_calls' must be an array of objects "
                           f'[{{"type": "function", "function": {{"name": ..., "arguments": ...}}}}, ...]; got {got}')
    for j, call in enumerate(calls):
        arguments = _arguments(call)
        if isinstance(arguments, str) and not isinstance(_json_object(arguments), dict):
            raise RequestError(f"{at}: tool_calls[{j}].function.arguments is a string that is not a JSON "
                               f"object ({arguments[:40]!r}): give the arguments as an object, or as "
                               "OpenAI's JSON text of one")
    return calls


def _arguments(call: dict):
    function = call.get("function")
    return function.get("arguments") if isinstance(function, dict) else None


_PROBE_KEY = "pa_probe"
_PROBE = {_PROBE_KEY: 1}  # a tool call's arguments, rendered to see how the template writes them


def _call_as(call, form: type):
    """``call`` (a copy where it changes) with its ``function.arguments`` of the other form
    made ``form``: JSON text of an object made the object (``dict``), an object made its JSON
    text (``str``), written as ``tojson`` writes it; anything else as it is."""
    arguments = _arguments(call) if isinstance(call, dict) else None
    if form is dict and isinstance(arguments, str):
        value = _json_object(arguments)
    elif form is str and isinstance(arguments, dict):
        value = json.dumps(arguments, ensure_ascii=False)
    else:
        return call
    if not isinstance(value, form):
        return call
    return {**call, "function": {**call["function"], "arguments": value}}


def _json_object(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tools(value, where: str) -> Optional[List[dict]]:
    """A request's (or training example's) ``"tools"``: the function schemas the template is
    given (``apply_chat_template(..., tools=tools)``), an array of objects; null is no tools
    (as OpenAI's API takes it, and as ``"tool_calls": null`` is none). Raises RequestError
    naming ``where``."""
    if value is None:
        return None
    got = _not_objects(value)
    if got is not None:
        raise RequestError(f"{where}: 'tools' must be an array of objects (function schemas, "
                           f'[{{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, ...]); got {got}')
    return value


def _not_objects(value) -> Optional[str]:
    """None for an array of objects; else what ``value`` is, for an error message."""
    if not isinstance(value, list):
        return jsonl.json_type(value)
    bad = [jsonl.json_type(v) for v in value if not isinstance(v, dict)]
    return f"an array holding {bad[0]}" if bad else None


def check_requests(requests: List[Request], chat: bool, path: str) -> None:
    """Without ``--chat``, no request may give ``"messages"``, ``"tools"`` or a field of how
    the rendering ends (:data:`ENDING_FIELDS`), null aside (all such lines in one error)."""
    if chat:
        return
    names = ("messages", "tools") + ENDING_FIELDS
    fields = {r.line: [k for k in names if (getattr(r, k) if k in ("messages", "tools") else r.extra.get(k))
                       is not None] for r in requests}
    bad = [f"{path}:{line}" for line, given in fields.items() if given]
    if bad:
        given = " or ".join(f"'{k}'" for k in names if any(k in g for g in fields.values()))
        raise refusal(f"{len(bad)} request(s) give {given}, which needs --chat (the tokenizer's "
                      "chat template renders them):", bad)


# -- the template ----------------------------------------------------------------------------

def missing_template(tokenizer, model_dir: Optional[str], instead: str) -> Optional[str]:
    """Why ``--chat`` cannot use ``tokenizer`` (None: it can); ``instead``: what to do without
    it ("serve", "train (raw text)"). ``model_dir``: the --model folder (None: the built-in
    model)."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return None
    whose = (f"the tokenizer of --model {model_dir}" if model_dir is not None
             else "the built-in model's byte tokenizer")
    return (f"--chat: {whose} has no chat template (no chat_template in its tokenizer_config.json "
            f"nor a chat_template.jinja); {instead} without --chat, or save the tokenizer with its "
            "template set (tokenizer.chat_template = ...)")


def check_template(model_dir: Optional[str]) -> None:
    """``generate --chat``: the tokenizer of ``--model model_dir`` has a chat template, checked
    before the model loads (a large model is not loaded to be refused). Raises RequestError."""
    from . import tiny

    ChatTemplate(tiny.load_tokenizer(model_dir), model_dir)


class ChatTemplate:
    """The token ids of prompt prefixes (system messages) and requests under ``--chat``.

    ``model_dir``: the --model folder (None: the built-in model), named in the RequestError
    raised when the tokenizer has no chat template; ``instead``: what it says to do then;
    ``options``: the template's variables (``--chat-option``, e.g. ``enable_thinking``)."""

    def __init__(self, tokenizer, model_dir: Optional[str] = None, instead: str = "serve",
                 options: Optional[dict] = None):
        problem = missing_template(tokenizer, model_dir, instead)
        if problem is not None:
            raise RequestError(problem)
        self.tokenizer = tokenizer
        self.options = dict(options or {})
        self.systems: Dict[str, Tuple[str, List[int]]] = {}  # prompt prefix -> (text, ids)

    def render(self, messages: List[dict], generation_prompt: bool,
               tools: Optional[List[dict]] = None, continue_final: bool = False) -> List[int]:
        """``apply_chat_template``'s token ids (the rendered text tokenised without special
        tokens: the template writes those it wants); ``tools``: the request's, if any;
        ``continue_final``: the rendering ends inside the last message (its
        ``continue_final_message``); tool calls' arguments in the form the template writes
        (:meth:`taken`)."""
        ids = self.tokenizer.apply_chat_template(self.taken(messages), tools=tools,
                                                 add_generation_prompt=generation_prompt,
                                                 continue_final_message=continue_final,
                                                 tokenize=True, return_dict=False, **self.options)
        return [int(i) for i in ids]

    def _text(self, messages: List[dict], tools: Optional[List[dict]], **ending) -> str:
        return self.tokenizer.apply_chat_template(self.taken(messages), tools=tools, tokenize=False, **ending,
                                                  **self.options)

    def taken(self, messages: List[dict]) -> List[dict]:
        """``messages`` as the template is given them: each tool call's arguments in the form it
        writes (:attr:`arguments_form`), OpenAI's JSON text of an object made the object for a
        template writing objects with ``tojson`` (else it writes a JSON string, the call encoded
        twice, as the model never saw it), an object made its JSON text for one writing the text
        as given; ``messages`` itself where nothing changes (never changed: copies)."""
        if not any(isinstance(m, dict) and m.get("tool_calls") for m in messages):
            return messages  # no call: the template is not probed
        form = self.arguments_form
        if form is None:
            return messages
        return [{**m, "tool_calls": [_call_as(c, form) for c in m["tool_calls"]]}
                if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else m for m in messages]

    @cached_property
    def arguments_form(self) -> Optional[type]:
        """How the template writes a tool call's arguments, found once by rendering a call
        (:data:`_PROBE`): ``dict`` where it writes an object as JSON (Qwen, Hermes, Llama 3.1,
        Mistral: ``arguments | tojson``, or the whole call's); else ``str`` where it writes JSON
        text as given (DeepSeek-V3 concatenates it); else None (it writes no call, or refuses
        both): the arguments go to it as they are."""
        written = self._probe_text(_PROBE)
        if written is not None and f'"{_PROBE_KEY}"' in written:  # JSON's quotes, not repr's
            return dict
        text = json.dumps(_PROBE)
        written = self._probe_text(text)
        return str if written is not None and text in written else None

    def _probe_text(self, arguments) -> Optional[str]:
        """The template's text of a conversation with a tool call of ``arguments`` (its content
        null, else "": DeepSeek's concatenates it), None where it refuses both."""
        for content in (None, ""):
            call = {"id": "paprobe01", "type": "function",  # 9 characters, as Mistral's wants
                    "function": {"name": "probe", "arguments": arguments}}
            messages = [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": content, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "paprobe01", "name": "probe", "content": "1"}]
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          **self.options)
            except Exception:  # the template's raise_exception, a Jinja error, ...
                continue
        return None

    def _continued_elsewhere(self, messages: List[dict], tools: Optional[List[dict]]) -> Optional[str]:
        """Why the template's rendering of ``messages`` continuing the last (assistant) one is
        not the rendering of the messages before it with the generation prompt, then the
        message's text (None: it is, or has more between the two, e.g. Qwen3's empty think
        block). Such a template writes the earlier messages otherwise once an answer follows
        (Mistral v0.3 drops the system message), or opens an answer with more than it writes
        before an assistant message (DeepSeek-R1's "<think>"): the answer would continue a
        conversation the model is not served with otherwise. Compared as text: the whole
        rendering is tokenised at once, so no token boundary is assumed."""
        opened = self._text(messages[:-1], tools, add_generation_prompt=True)
        continued = self._text(messages, tools, continue_final_message=True)
        if continued.startswith(opened):
            return None
        i = next((k for k, (x, y) in enumerate(zip(opened, continued)) if x != y), min(len(opened), len(continued)))
        return (f"the chat template writes the conversation continuing the last (assistant) message "
                f"otherwise than it opens a new answer (with the generation prompt): from character {i}, "
                f"{opened[i:i + 3 * _SHOWN]!r} opening an answer but {continued[i:i + 3 * _SHOWN]!r} before the "
                f"message continued; start the message's content with what opens an answer, or give "
                f"the conversation without \"continue_final_message\"")

    def system_ids(self, name: str, text: str) -> List[int]:
        """The ids of prompt prefix ``name``: the template rendered for [system(text)] alone,
        less a last end-of-sequence token (which templates such as Phi-3's write at the end of
        any conversation rendered without the generation prompt)."""
        try:
            ids = self.render([{"role": "system", "content": text}], generation_prompt=False)
        except Exception as exc:  # the template's raise_exception, a Jinja error, ...
            raise RequestError(f"--prompt-prefix {name}: the chat template refuses a system message "
                               f"alone ({type(exc).__name__}: {_first_line(exc)}): the system prompt "
                               "cannot be shared as a prefix with this template") from None
        if not ids:
            raise RequestError(f"--prompt-prefix {name}: the chat template renders a system message "
                               "alone as no tokens (it leaves system messages out, or writes them only "
                               "with a user turn): the system prompt cannot be shared as a prefix with "
                               "this template")
        if self._without_its_text(ids, text):
            shown = repr(self.tokenizer.decode(ids, skip_special_tokens=False))
            raise RequestError(f"--prompt-prefix {name}: the chat template renders a system message alone "
                               f"as {shown} whatever its text (it writes the system message only with a "
                               "user turn, folded into one): the system prompt cannot be shared as a "
                               "prefix with this template")
        if len(ids) > 1 and ids[-1] == self.tokenizer.eos_token_id:
            # the end of sequence that closes a conversation rendered with no generation prompt
            # (Phi-3: after [system] alone, never after a turn a user turn follows): not the
            # system part's; the entry is checked against each conversation's start as any is
            ids = ids[:-1]
        self.systems[name] = (text, ids)
        return ids

    def _without_its_text(self, ids: List[int], text: str) -> bool:
        """Whether the template renders [system] alone as ``ids`` whatever the system message
        says (e.g. only its BOS, Gemma 3 and Mistral v0.3 writing the message into a user
        turn): the entry would hold none of it, and each request would carry it whole."""
        # two other texts, both rendered as ``ids``: one alone may render as ``text`` does (a
        # template trimming the message, Llama 3's, makes "A." and "A.\n" the same tokens)
        try:
            return all(self.render([{"role": "system", "content": other}], generation_prompt=False) == ids
                       for other in _OTHER_SYSTEMS)
        except Exception:  # a template refusing only that text: not one that leaves it out
            return False

    def request_ids(self, requests: List[Request], bank, path: str) -> Dict[int, List[int]]:
        """Each request's ids (by line): after a prompt prefix, its conversation's ids less the
        system part's. A template that renders a system prompt differently when a user turn
        follows is one error naming each such prefix (raised first: it is the template's, not
        the requests'); the requests' own problems (a prompt entry of --bank, which has no text
        to render, a system message after a prompt prefix, a conversation the template
        refuses) are otherwise all named in one error."""
        ids: Dict[int, List[int]] = {}
        split: Dict[str, List[str]] = {}  # prefix -> where its system part is not the conversation's start
        first_diff: Dict[str, str] = {}
        bad: List[str] = []
        with_tools = False  # a split request gives "tools" (templates write them in the system part)
        for r in requests:
            where = f"{path}:{r.line}"
            messages = r.messages if r.messages is not None else [{"role": "user", "content": r.prompt}]
            system = None
            if r.prefix is not None and bank.kind(r.prefix) == "prompt":
                if r.prefix not in self.systems:
                    bad.append(f"{where}: prompt prefix {r.prefix!r} comes from --bank, which keeps no "
                               f"text to render as the system message; give it as --prompt-prefix "
                               f"{r.prefix}=TEXT")
                    continue
                if messages[0]["role"] == "system":
                    bad.append(f"{where}: 'messages' starts with a system message, but prefix "
                               f"{r.prefix!r} is the system message; leave one of them out")
                    continue
                system = self.systems[r.prefix]
                messages = [{"role": "system", "content": system[0]}] + messages
            try:
                full = self.render(messages, r.generation_prompt, r.tools, r.continue_final)
                problem = self._continued_elsewhere(messages, r.tools) if r.continue_final else None
            except Exception as exc:
                bad.append(f"{where}: the chat template refuses this conversation{_continuing(r, exc)} "
                           f"({type(exc).__name__}: {_first_line(exc)})")
                continue
            if problem is not None:
                bad.append(f"{where}: {problem}")
                continue
            if system is None:
                ids[r.line] = full
                continue
            head = system[1]
            if full[:len(head)] != head:
                split.setdefault(r.prefix, []).append(where)
                with_tools = with_tools or r.tools is not None
                first_diff.setdefault(r.prefix, self._difference(head, full))
                continue
            ids[r.line] = full[len(head):]
        if split:
            lines = []
            for name, wheres in split.items():
                shown = ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")
                lines.append(f"--prompt-prefix {name}: {first_diff[name]} (requests {shown})")
            tools = " (or, for requests giving \"tools\", writes the tools into it)" if with_tools else ""
            raise refusal(
                "the system prompt cannot be shared as a prefix with this chat template: it renders "
                f"the system message differently once a user turn follows{tools}, so the prefix's KV "
                "would not be the conversation's. Give the system message in each request's "
                "\"messages\" (with no prefix) instead:", lines)
        if bad:
            raise refusal(f"{len(bad)} request(s) that --chat cannot render:", bad)
        return ids

    def _difference(self, alone: List[int], full: List[int]) -> str:
        i, shown_alone, shown_full = difference(self.tokenizer, alone, full)
        return (f"its {len(alone)} tokens alone are not the conversation's first ones: from token {i}, "
                f"{shown_alone} alone but {shown_full} once a user turn follows")


def _continuing(r: Request, exc: Exception) -> str:
    """What a template refusing request ``r`` (raising ``exc``) refused, where transformers
    found the last message, continued, not written at its end (the template strips or rewrites
    it); nothing for a template's own error (a system message it refuses)."""
    refused = r.continue_final and "continue_final_message" in str(exc)  # transformers' check
    return (" continuing its last message (\"continue_final_message\": the template must write "
            "that message's content as given, at the end)" if refused else "")


def difference(tokenizer, a: List[int], b: List[int]) -> Tuple[int, str, str]:
    """Where token lists ``a`` and ``b`` first differ (the shorter one's length where it starts
    the other), and the next tokens of each from there, decoded with special tokens."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def show(ids):
        return repr(tokenizer.decode(ids[i:i + _SHOWN], skip_special_tokens=False))
    return i, show(a), show(b)


def options_need_chat(options: list, chat: bool) -> Optional[str]:
    """Why ``--chat-option`` cannot be taken (None: it can): it sets template variables, so it
    needs ``--chat``."""
    if options and not chat:
        return (f"--chat-option {'='.join(map(str, options[0]))}: template variables need --chat "
                "(without it no chat template renders the text)")
    return None
