"""How ``prefix-attn serve`` streams a completion while its batch generates (``"stream": true``):
:class:`BatchStreamer` is the streamer model.generate hands each step's tokens to, one per row;
:class:`RowText` turns a row's tokens into text given out only once it is stable, so that the
pieces sent add up to exactly what :func:`prefix_attn.serve_stop.finish` gives for the row;
:class:`Chunks` writes them as OpenAI's server-sent events."""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable, List, Optional, Sequence

from transformers.generation.streamers import BaseStreamer

from .serve_stop import _decode, _first_stop

DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    """One server-sent event: ``data: JSON`` and a blank line."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _stop_start(text: str, stops: Sequence[str]) -> int:
    """Where the tail of ``text`` that could still become one of ``stops`` begins (``len(text)``:
    no tail could)."""
    longest = max((len(s) for s in stops), default=0)
    for i in range(max(len(text) - longest + 1, 0), len(text)):
        if any(s.startswith(text[i:]) for s in stops):
            return i
    return len(text)


class RowText:
    """One row's text as its new tokens come (``add``), as :func:`serve_stop.finish` reads it:
    up to a stop id, padding left out, up to the first stop text. Text is given out only where it
    is stable: the part two successive decodings agree on (a token may still merge with the
    next), short of a trailing U+FFFD (a character whose bytes are not all there) and of a tail
    that could be the start of a stop text. ``done`` once a stop id or a stop text ended the row;
    ``new`` holds every token seen (what :func:`finish` takes); ``special``: special tokens kept
    in the text, as :func:`finish` keeps them for a tool-call parser."""

    ANCHOR_EVERY = 64  # tokens decoded past the anchor before it moves (one whole decoding then)

    def __init__(self, tokenizer, stop_ids: Sequence[int], pad_id: Optional[int], stops: Sequence[str],
                 special: bool = False):
        self.tokenizer, self.stop_ids, self.pad_id, self.stops = tokenizer, list(stop_ids), pad_id, list(stops)
        self.special = special
        self.new: List[int] = []
        self.tokens: List[int] = []  # the text's tokens
        self.pads = 0  # pad tokens after them: the text's if other tokens follow (finish keeps them)
        self.sent, self.previous, self.done = "", "", False
        # the text is anchor_text + the decoding of tokens[anchor:]: decoding every token at
        # every step cost a time growing with the square of the length
        self.anchor, self.anchor_text, self.anchored = 0, "", True

    def _text(self) -> str:
        """The decoding of ``tokens``: that of the tokens past the anchor after the anchor's text.
        Every ANCHOR_EVERY tokens the whole decoding is compared with it (the same, or the row
        decodes whole from then on) and the anchor moves to a token where the whole decoding
        is its text before plus the decoding from there (a SentencePiece word's space, a
        character's bytes split across tokens: a token where that fails is passed over)."""
        text = self.anchor_text + _decode(self.tokenizer, self.tokens[self.anchor:], self.special)
        if not self.anchored or len(self.tokens) - self.anchor < 2 * self.ANCHOR_EVERY:
            return text
        whole = _decode(self.tokenizer, self.tokens, self.special)
        if whole != text:  # a tokenizer whose decoding is not the anchored one's
            self.anchored, self.anchor, self.anchor_text = False, 0, ""
            return whole
        for a in range(len(self.tokens) - self.ANCHOR_EVERY, len(self.tokens) - 2 * self.ANCHOR_EVERY, -1):
            tail = _decode(self.tokenizer, self.tokens[a:], self.special)
            head = whole[:len(whole) - len(tail)]
            if tail and whole.endswith(tail) and not head.endswith("\ufffd") and not tail.startswith("\ufffd"):
                self.anchor, self.anchor_text = a, head
                break
        return whole

    def _agreed(self, text: str) -> str:
        """The longest start that ``text`` and the previous step's text share, compared past the
        text already sent (both start with it while the decoding is stable: a check at C speed)."""
        n = len(self.sent)
        if self.previous.startswith(self.sent) and text.startswith(self.sent):
            return self.sent + common_prefix(self.previous[n:], text[n:])
        return common_prefix(self.previous, text)

    def add(self, token: int) -> str:
        """The text newly stable once ``token`` is the row's next one ("" if none)."""
        if self.done:
            return ""
        self.new.append(token)
        if token in self.stop_ids:
            self.done = True
            return ""
        if token == self.pad_id:  # model.generate's filler after the row ended, or the model's own
            self.pads += 1
            return ""
        self.tokens.extend([self.pad_id] * self.pads + [token])
        self.pads = 0
        text = self._text()
        cut = _first_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self.done, stable = True, text[:cut]
        else:
            stable = self._agreed(text).rstrip("\ufffd")
            stable = stable[:_stop_start(stable, self.stops)]
        self.previous = text
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta


class BatchStreamer(BaseStreamer):
    """model.generate's streamer (transformers' ``put`` / ``end``): its first ``put`` is the
    prompt ``(rows, prompt_len)``, left out; each later one a step's token of every row,
    ``(rows,)``, handed to ``rows[i]`` (None: a row not streamed) with its log probabilities
    where ``steps`` (a :class:`prefix_attn.serve_logprobs.Steps`) keeps them for that row, else
    None. Greedy and sampled decoding only: transformers refuses a streamer with beam search."""

    def __init__(self, rows: Sequence[Optional[Callable[[int, Optional[tuple]], None]]], steps=None):
        self.rows, self.steps, self.prompt_seen = list(rows), steps, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        scores = self.steps.take(tokens) if self.steps is not None else {}
        for i, (take, token) in enumerate(zip(self.rows, tokens)):
            if take is not None:
                take(token, scores.get(i))

    def end(self) -> None:
        pass


class Chunks:
    """The events of one streamed answer, as OpenAI's API sends them: ``text_completion``
    chunks (``chat``: ``chat.completion.chunk``, a first one with the assistant's role), all
    with one id, time and model; with ``usage`` (``stream_options.include_usage``), each has
    ``"usage": null`` and a last one, with no choices, the usage."""

    def __init__(self, chat: bool, model: str, usage: bool):
        kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        self.chat, self.usage = chat, usage
        self.head = {"id": f"{kind[0]}-{uuid.uuid4().hex}", "object": kind[1], "created": int(time.time()),
                     "model": model}

    def _choice(self, delta: dict, reason: Optional[str], index: int, logprobs: Optional[dict] = None) -> bytes:
        choice = ({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason} if self.chat else
                  {"index": index, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": reason})
        return event({**self.head, "choices": [choice], **({"usage": None} if self.usage else {})})

    def role(self, index: int = 0) -> bytes:
        """A chat stream's first event of choice ``index`` (nothing for a completion)."""
        return self._choice({"role": "assistant", "content": ""}, None, index) if self.chat else b""

    def text(self, delta: str, index: int = 0, logprobs: Optional[dict] = None) -> bytes:
        """An event of choice ``index``'s text ``delta`` and the ``logprobs`` of its tokens."""
        return self._choice({"content": delta}, None, index, logprobs)

    def tool_calls(self, calls: List[dict], index: int = 0) -> bytes:
        """The event of choice ``index``'s tool calls, each whole, as OpenAI's chunk gives them
        (``delta.tool_calls``, each with its ``index``)."""
        return self._choice({"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}, None, index)

    def finish(self, reason: str, index: int = 0) -> bytes:
        """The event that ends choice ``index``: its finish_reason."""
        return self._choice({}, reason, index)

    def end(self, usage: dict) -> bytes:
        """The events that end the stream, once every choice ended: the usage if asked, then [DONE]."""
        return (event({**self.head, "choices": [], "usage": usage}) if self.usage else b"") + DONE
