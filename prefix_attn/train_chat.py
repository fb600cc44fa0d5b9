"""``prefix-attn train --chat``: examples rendered with the tokenizer's chat template, as
``prefix-attn generate --chat`` renders requests, the loss on the answer's turn only.

An example is a conversation that ends in the assistant message to learn, the answer:
``{"prompt": P, "completion": C}`` is ``[user(P), assistant(C)]`` (``prompt`` optional, ""),
and ``{"messages": [...]}`` is a request's ``messages`` as ``generate --chat`` takes them (a
system message only first, the last one a user or tool message) followed by one assistant
message (a tool call, ``content`` null with ``tool_calls``, too: its rendered call is learnt;
its arguments, an object or OpenAI's JSON text of one, rendered in the form the template writes,
as generate --chat renders them).
Either form may give ``"tools"``, the function schemas the template is given, as a request
does. ``{"text"}`` examples and plain-text files have no turns: refused.

Its tokens are the template's rendering of the whole conversation (no generation prompt).
Its context, the tokens before the answer, must be exactly those ``generate --chat`` feeds
for the conversation less the answer: the template's rendering of it with the generation
prompt. That is checked token by token, not assumed: a template whose generation prompt is
not how it starts an assistant turn, an answer whose first characters merge into one
token with the generation prompt's last, or a template rendering the earlier messages otherwise
once an answer follows (Mistral v0.3 writes the system message into the last message only
while that is a user turn), is refused (every such example named in one error),
never trained on tokens the served prefix would not see. Labels: -100 on the context, the
ids on the rest, i.e. the answer and what the template writes after it (its end-of-turn
tokens, e.g. ``<|im_end|>``), as TRL's assistant-only loss learns them.

Why this and not the template's ``{% generation %}`` markers (``return_assistant_tokens_mask``):
few templates have them, and a character mask does not say the tokens before the answer are
the generation prompt's (a merge across the boundary, or a header rendered otherwise, goes
unnoticed); the check above is what makes training and serving see the same tokens.

``--chat-turns last`` (the default): only the last assistant message is learnt; earlier ones
are context, as they are in a request's ``messages`` (templates may render an assistant turn
differently once it is history, e.g. without its reasoning, so an earlier turn's tokens in the
conversation need not be those the model generates).

``--chat-turns all``: every assistant message is learnt, in the one row of the whole
conversation. Each earlier turn J is checked as the last one is: the rendering of
``messages[:J]`` with the generation prompt (what generate --chat feeds) and that of
``messages[:J + 1]`` without it (the conversation ending with turn J: the tokens its turn
learns, as ``last`` would learn them) must both be the whole conversation's first tokens; the
turn's labels are the tokens between the two. A template rewriting earlier turns (Qwen3 drops
their think block; one writing a turn otherwise when it is not the last) fails that: every
such example is named with its turn in one error (use ``last``, or split the conversation).
An EOS ending the shorter rendering where the whole one has none (Phi-3 closes a conversation
rendered without the generation prompt with it) is not the turn's: the turn ends before it,
as a prompt prefix's entry leaves it out. Each learnt turn must answer a user or tool message.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

from . import jsonl, tiny
from .chat import ChatTemplate, difference, parse_example_messages, parse_tools
from .serve_inputs import RequestError
from .tiny import _first_line
from .train_state import TrainError

_MAX_LISTED = 10  # examples named in one error; the rest are counted

Example = Tuple[str, List[dict], Optional[List[dict]]]  # (where, messages, tools)
Row = Optional[Tuple[List[int], List[int]]]  # (ids, labels); None: an empty example


TURNS = ("last", "all", "each")  # --chat-turns: the assistant turns learnt, and in which rows


class TurnOf(str):
    """The name of a ``--chat-turns each`` row (``FILE:LINE: messages[J] (assistant turn K of
    N)``) that keeps its example's (``example``: what the example's other fields, its
    ``"prefix"``, are found by)."""

    example: str

    def __new__(cls, text: str, example: str) -> "TurnOf":
        name = super().__new__(cls, text)
        name.example = example
        return name


def example_of(where: str) -> str:
    """The example a row named ``where`` comes from: its own name, or a turn's example."""
    return getattr(where, "example", where)


class NotTheContext(Exception):
    """The template's rendering with the generation prompt is not the conversation's start."""


class NotAfterSystem(Exception):
    """The conversation rendered with the system message does not start with the tokens of
    the system message alone (the prompt prefix's entry)."""


class NoAnswer(Exception):
    """The template renders the learnt (last) assistant turn as no tokens."""


class EarlierTurn(Exception):
    """An earlier assistant turn (``--chat-turns all``) is not in the whole conversation as
    generate --chat would feed and answer it: ``str()`` names the message and says how."""


def _listed(headline: str, problems: List[str]) -> TrainError:
    lines = [headline] + [f"  {p}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  and {len(problems) - _MAX_LISTED} more")
    return TrainError("\n".join(lines))


def _blank(messages: List[dict]) -> bool:
    """Whether every message is blank: no content but blanks, no tool call."""
    return not any((m.get("content") or "").strip() or m.get("tool_calls") for m in messages)


# -- the data file ---------------------------------------------------------------------------

def read_examples_at(path: str, what: str = "data file") -> List[Example]:
    """[(where, messages, tools)] of a ``.jsonl`` / ``.json`` file (``where``: ``path:line`` as
    :func:`prefix_attn.train_data.read_examples_at` names it). Raises :class:`TrainError` naming
    the example on bad data; all the ``{"text"}`` examples in one error."""
    lines = jsonl.read_lines(path, TrainError, what=what)
    if not jsonl.is_json_path(path):
        raise TrainError(f"{path}: --chat reads .jsonl / .json examples ({{\"prompt\", \"completion\"}} or "
                         "{\"messages\"} per line); this file is read as plain text, one raw example a "
                         "line, which has no turns to render (rename it to .jsonl if it holds JSON lines)")
    examples, texts = [], []
    for where, obj in jsonl.json_records(path, lines, TrainError, arrays=True):
        if isinstance(obj, dict) and "text" in obj:
            texts.append(where)
            continue
        examples.append((where, *_conversation(where, obj)))
    if texts:
        raise _listed(f"{len(texts)} example(s) give 'text', which --chat cannot render as a conversation "
                      "(the loss is on an assistant turn): give {\"prompt\", \"completion\"} or "
                      "{\"messages\"}, or train without --chat:", texts)
    if not examples:
        raise TrainError(f"{path}: no examples (the file is empty or has only blank lines)")
    return examples


def _conversation(where: str, obj) -> Tuple[List[dict], Optional[List[dict]]]:
    """(messages, tools) of one example."""
    if not isinstance(obj, dict):
        raise TrainError(f"{where}: expected a JSON object, got {jsonl.json_type(obj)}"
                         + jsonl.array_hint(where, obj))
    try:
        tools = parse_tools(obj.get("tools"), where)
        if "messages" in obj:
            if "prompt" in obj or "completion" in obj:
                raise TrainError(f"{where}: give either 'messages' or 'prompt'/'completion', not both")
            return parse_example_messages(obj["messages"], where), tools
    except RequestError as exc:
        raise TrainError(str(exc)) from None
    if "completion" not in obj:
        found = ", ".join(repr(k) for k in obj) or "none"
        raise TrainError(f"{where}: expected 'completion' (with an optional 'prompt') or 'messages' "
                         f"under --chat; fields found: {found}")
    for key in ("prompt", "completion"):
        if key in obj and not isinstance(obj[key], str):
            raise TrainError(f"{where}: field {key!r} must be a string, got {jsonl.json_type(obj[key])}")
    return [{"role": "user", "content": obj.get("prompt", "")},
            {"role": "assistant", "content": obj["completion"]}], tools


# -- the template ----------------------------------------------------------------------------

class ChatExamples:
    """The (ids, labels) of conversations under the tokenizer's chat template. ``model_dir``:
    the --model folder (None: the built-in model), named when the tokenizer has none."""

    def __init__(self, tokenizer, model_dir: Optional[str] = None, options: Optional[dict] = None,
                 turns: str = "last"):
        assert turns in TURNS, turns
        self.turns = turns
        try:
            self.template = ChatTemplate(tokenizer, model_dir, "train on raw text", options)
        except RequestError as exc:
            raise TrainError(str(exc)) from None
        self.tokenizer = tokenizer
        self.system: Optional[Tuple[str, str, List[int]]] = None  # (prompt prefix, its text, its ids)

    def after_system(self, name: str, text: str, head: List[int]) -> "ChatExamples":
        """These examples as scored after prompt prefix ``name`` (``prefix-attn eval --chat``),
        the system message ``text`` whose entry holds the KV of ``head`` (the template's
        rendering of [system] alone, :meth:`prefix_attn.chat.ChatTemplate.system_ids`): each
        conversation rendered with that system message first, as generate --chat renders a
        request after it, its row then without ``head``, checked to be its first tokens
        (else :class:`NotAfterSystem`, all such rows named in one error by :meth:`rows`)."""
        other = copy.copy(self)
        other.system = (name, text, list(head))
        return other

    @classmethod
    def of_model(cls, model_dir: Optional[str], options: Optional[dict] = None,
                 turns: str = "last") -> "ChatExamples":
        """For ``--model model_dir`` (None: the built-in model, whose byte tokenizer has no
        template), the template variables ``options`` and ``--chat-turns turns``: checked
        before the model loads."""
        if model_dir is None:
            return cls(tiny.ByteTokenizer(), None, options, turns)
        try:
            return cls(tiny.load_tokenizer(model_dir), model_dir, options, turns)
        except tiny.TokenizerError as exc:
            raise TrainError(str(exc)) from None

    def encode(self, messages: List[dict], tools: Optional[List[dict]] = None) -> Tuple[List[int], int]:
        """(ids of the whole conversation, tokens of its context), the template given ``tools``.
        Raises NotTheContext saying why the context is not the conversation's first tokens;
        the template's own errors pass through."""
        context = self.template.render(messages[:-1], generation_prompt=True, tools=tools)
        full = self.template.render(messages, generation_prompt=False, tools=tools)
        if full[:len(context)] != context:
            i, shown_context, shown_full = difference(self.tokenizer, context, full)
            raise NotTheContext(f"from token {i}, {shown_context} with the generation prompt but "
                                f"{shown_full} in the conversation")
        return full, len(context)

    def spans(self, messages: List[dict], tools: Optional[List[dict]] = None) -> Tuple[List[int], List[Tuple[int, int]]]:
        """(ids of the whole conversation, [start, end) of each assistant turn learnt): the last
        one's (:meth:`encode`, checked first: its errors are today's); under ``--chat-turns
        all``, each earlier one's too, from the end of its context (the messages before it,
        rendered with the generation prompt) to the end of the conversation rendered up to it
        (what the last turn of that shorter conversation learns), both checked to be the whole
        conversation's first tokens, else :class:`EarlierTurn`. One exception: a last EOS of
        that shorter rendering, which the whole one does not have there (Phi-3 ends any
        conversation rendered without the generation prompt so), is not the turn's (the turn
        ends before it), as a prompt prefix's entry leaves it out."""
        full, n = self.encode(messages, tools)
        learnt = [(n, len(full))]
        if self.turns != "all":
            return full, learnt
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        given = 1 if self.system is not None else 0  # the system message prepended: not the example's
        for k, j in enumerate(turns[:-1]):
            at = f"messages[{j - given}] (assistant turn {k + 1} of {len(turns)})"
            context = self.template.render(messages[:j], generation_prompt=True, tools=tools)
            if full[:len(context)] != context:
                raise EarlierTurn(f"{at}: its context (the messages before it, with the generation prompt) "
                                  f"{self._differs(context, full)}")
            upto = self.template.render(messages[:j + 1], generation_prompt=False, tools=tools)
            if full[:len(upto)] != upto and upto[-1:] == [self.tokenizer.eos_token_id]:
                upto = upto[:-1]  # the EOS closing the shorter conversation (Phi-3): not the turn's
            if full[:len(upto)] != upto:
                raise EarlierTurn(f"{at}: the conversation ending with it (its tokens as generate --chat "
                                  f"answers it) {self._differs(upto, full)}")
            if len(upto) <= len(context):
                raise EarlierTurn(f"{at}: the chat template renders it as no tokens")
            learnt.insert(k, (len(context), len(upto)))
        return full, learnt

    def _differs(self, part: List[int], full: List[int]) -> str:
        i, shown_part, shown_full = difference(self.tokenizer, part, full)
        return f"differs from the whole conversation from token {i}: {shown_part} but {shown_full}"

    def rows(self, examples_at: Sequence[Example]) -> List[Tuple[str, Row]]:
        """[(where, (ids, labels))], labels the ids on the learnt turns (:meth:`spans`), -100
        elsewhere; None for a conversation whose messages are all blank (dropped, as an empty
        text is). One row per example; under ``--chat-turns each``, one per assistant turn
        (:meth:`conversations`), ``where`` naming the turn too. Every row whose (last) context
        is not the conversation's first tokens is named in one :class:`TrainError` (raised
        first: it is the template's problem); then every example with an earlier turn that
        cannot be learnt (``--chat-turns all``); else every row the template refuses, in one."""
        out, refused, split, earlier, apart = [], [], [], [], []
        for where, messages, tools in examples_at:
            if not _blank(messages):
                self._check_answers(where, messages)
            for at, conversation in self.conversations(where, messages):
                try:
                    out.append((at, self._row(conversation, tools)))
                except NotAfterSystem as exc:
                    apart.append(f"{at}: {exc}")
                except NotTheContext as exc:
                    split.append(f"{at}: {exc}")
                except EarlierTurn as exc:
                    earlier.append(f"{at}: {exc}")
                except NoAnswer:
                    refused.append(f"{at}: the chat template renders the answer as no tokens (it leaves "
                                   "assistant messages out)")
                except Exception as exc:  # the template's raise_exception, a Jinja error, ...
                    refused.append(f"{at}: the chat template refuses this conversation "
                                   f"({type(exc).__name__}: {_first_line(exc)})")
        rows = "assistant turn(s)" if self.turns == "each" else "example(s)"
        if apart:
            raise _listed(
                f"--prompt-prefix {self.system[0]}: the system prompt cannot be shared as a prefix with this "
                "chat template: it renders the system message differently once a user turn follows (or "
                "writes an example's \"tools\" into it), so the prefix's KV would not be the "
                f"conversation's, as generate --chat refuses it; {len(apart)} {rows} differ. Give the system "
                "message in each example's \"messages\" (scored with no prefix) instead:", apart)
        if split:
            raise _listed(
                f"--chat: for {len(split)} {rows} the chat template's rendering of the conversation "
                "less its answer, with the generation prompt (what generate --chat feeds), is not the "
                "first tokens of the whole conversation, so the prefix would learn after other tokens "
                "than it is served with. The template's generation prompt is not how it starts an "
                "assistant turn (a think block the answer's rendering drops, say), the answer's first "
                "characters merge into one token with the generation prompt's last (an answer starting "
                "with a space or a newline), or the template renders the earlier messages otherwise "
                "once an answer follows (Mistral v0.3's writes the system message into the last "
                "message only while that is a user turn):", split)
        if earlier:
            raise _listed(
                f"--chat-turns all: in {len(earlier)} example(s) an earlier assistant turn is not in the "
                "whole conversation as generate --chat would feed and answer it: the chat template "
                "renders the conversation up to that turn otherwise once later messages follow (it "
                "rewrites earlier assistant turns, as Qwen3's drops their <think> block, or writes a "
                "turn otherwise when it is not the last), so one pass over the whole conversation "
                "would learn tokens generate --chat never produces. Use --chat-turns each (every turn "
                "learnt in a row of its own, the conversation up to it, as generate --chat feeds and "
                "answers it: the shared context is computed once per turn), or --chat-turns last (the "
                "last turn only):", earlier)
        if refused:
            raise _listed(f"--chat: {len(refused)} {rows} that the chat template cannot render:", refused)
        return out

    def conversations(self, where: str, messages: List[dict]) -> List[Tuple[str, List[dict]]]:
        """[(where, conversation)]: the rows an example makes, each the conversation that ends
        with the turn(s) it learns. The example itself, but under ``--chat-turns each`` one per
        assistant message J, ``messages[:J + 1]`` (``where`` then names it: ``messages[J]
        (assistant turn K of N)``), so that row is the one ``last`` makes of that conversation."""
        if self.turns != "each":
            return [(where, messages)]
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        return [(TurnOf(f"{where}: messages[{j}] (assistant turn {k + 1} of {len(turns)})", where),
                 messages[:j + 1]) for k, j in enumerate(turns)]

    def _row(self, messages: List[dict], tools: Optional[List[dict]]) -> Row:
        """The (ids, labels) of one conversation (:meth:`spans`); None when its messages are all
        blank. Raises :class:`NoAnswer` when the last turn is no tokens; :meth:`spans`' errors,
        and the template's, pass through."""
        if _blank(messages):
            return None
        if self.system is not None:
            messages = [{"role": "system", "content": self.system[1]}] + messages
        ids, learnt = self.spans(messages, tools)
        start, end = learnt[-1]
        if start == end:
            raise NoAnswer()
        labels = [-100] * len(ids)
        for start, end in learnt:
            labels[start:end] = ids[start:end]
        return self._after_system(ids, labels)

    def _after_system(self, ids: List[int], labels: List[int]) -> Tuple[List[int], List[int]]:
        """The row less the system message's tokens (:meth:`after_system`); as it is without one.
        Raises :class:`NotAfterSystem` where they are not its first tokens."""
        if self.system is None:
            return ids, labels
        head = self.system[2]
        if ids[:len(head)] != head:
            i, shown_alone, shown_full = difference(self.tokenizer, head, ids)
            raise NotAfterSystem(f"the system message's {len(head)} tokens alone are not the conversation's "
                                 f"first ones: from token {i}, {shown_alone} alone but {shown_full} in it")
        return ids[len(head):], labels[len(head):]

    def _check_answers(self, where: str, messages: List[dict]) -> None:
        """Under ``--chat-turns all`` and ``each``, each assistant message follows a user or tool
        message, as generate --chat answers one (the last one's is checked as the example is
        read). Raises :class:`TrainError` naming the example and the message."""
        if self.turns == "last":
            return
        for j, m in enumerate(messages):
            before = messages[j - 1]["role"] if j else None
            if m["role"] == "assistant" and before not in ("user", "tool"):
                got = "it is the first message" if before is None else f"it follows a {before!r} message"
                raise TrainError(f"{where}: messages[{j}]: --chat-turns {self.turns} learns every assistant "
                                 f"message as an answer to a user or tool message, as generate --chat gives "
                                 f"one; {got} (merge the two, or use --chat-turns last)")
