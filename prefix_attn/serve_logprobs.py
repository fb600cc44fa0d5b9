"""Log probabilities for ``prefix-attn serve`` ("logprobs", "top_logprobs", "echo"): the tokens of
each answer scored by one more forward pass of prompt + completion after the request's prefix,
every scored request of a batch in one call (:func:`score`), and their entries in the shapes of
OpenAI's API: the legacy completions' ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`` (:func:`completion_logprobs`) and chat's ``{"content": [...]}``
(:func:`chat_logprobs`). A streamed answer's are taken as model.generate runs (:class:`Steps`, a
forward hook) and given out with its text, chunk by chunk (:class:`Streamed`).

The log probabilities are the model's own distribution given the prefix and the tokens before:
``log_softmax`` of its logits in float32, before temperature, top-p / top-k / min-p and the
repetition penalty (vLLM's default). A token's string is the token decoded alone (special tokens
kept); a token that is part of a UTF-8 character (it decodes alone to U+FFFD) is
``"bytes:\\xNN..."``, its own bytes as OpenAI writes them, where the tokenizer says them
(prefix-attn's byte tokenizer, a ``<0xNN>`` byte token, a token of a byte-level BPE: GPT-2's,
Llama 3's, Qwen's scheme, which writes each byte as a character), else that decoding with U+FFFD;
chat's "bytes" are the token's own bytes where the tokenizer says them, else the UTF-8 of its
string: the "bytes" of a choice's entries joined are the UTF-8 of its content."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import serve_stream, tiny
from .hf.hooks import forward_params


@dataclass
class Scored:
    """One row's scored tokens: ``tokens[i]`` (a token id), its log probability ``chosen[i]``
    (None for a first prompt token: nothing before it to predict it from) and the ``top``
    tokens of its position (id, log probability), most likely first (None where ``chosen`` is)."""

    tokens: List[int]
    chosen: List[Optional[float]]
    top: List[Optional[List[tuple]]]


@dataclass
class Row:
    """What to score: ``prompt`` then ``completion`` ids after bank entry ``prefix``; ``echo``:
    the prompt's tokens too (from its second on), else the completion's only; ``k`` top tokens
    at each position."""

    prefix: Optional[str]
    prompt: List[int]
    completion: List[int]
    echo: bool
    k: int

    @property
    def first(self) -> int:
        """The first token scored, an index into prompt + completion."""
        return min(1, len(self.prompt)) if self.echo else len(self.prompt)


def score(model, rows: List[Row], pad_id: Optional[int], device: torch.device) -> List[Scored]:
    """Each row scored by one forward of every row together (left padded, as generate runs them;
    the positions after a prefix counted from it by the model's hook). Only the last columns
    holding a scored token's logits are kept where the model takes ``logits_to_keep``. Equal
    rows (the choices of one prompt, "n"; equal prompts of an array) are scored once and share
    their result."""
    keys = [(r.prefix, tuple(r.prompt), tuple(r.completion), r.echo, r.k) for r in rows]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) < len(rows):
        got = dict(zip(first, score(model, [rows[i] for i in first.values()], pad_id, device)))
        return [got[key] for key in keys]
    ids, mask = tiny.left_pad([r.prompt + r.completion for r in rows], pad_id)
    width = ids.shape[1]
    keep = max(len(r.prompt) + len(r.completion) - r.first for r in rows) + 1
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in forward_params(model) else {}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       prefixes=[r.prefix for r in rows], **kwargs).logits
    start = width - logits.shape[1]  # the column of logits[:, 0]
    scored = []
    for b, r in enumerate(rows):
        seq = r.prompt + r.completion
        n = len(seq) - r.first  # tokens seq[first:], each predicted by the column before its own
        cols = slice(width - n - 1 - start, width - 1 - start)
        lp = torch.log_softmax(logits[b, cols].float(), dim=-1)
        want = torch.tensor(seq[r.first:], dtype=torch.long, device=lp.device)
        chosen = lp.gather(-1, want[:, None])[:, 0].tolist()
        values, top_ids = lp.topk(min(r.k, lp.shape[-1]), dim=-1)
        top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        head = r.first if r.echo else 0  # the unscored first prompt token
        scored.append(Scored(seq[r.first - head:], [None] * head + chosen, [None] * head + top))
    return scored


class Names:
    """A tokenizer's strings of single tokens: ``name`` (the token decoded alone, special tokens
    kept) and ``bytes``, each decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._names: Dict[int, str] = {}
        self._byte_level = byte_level_table(tokenizer)

    def name(self, token: int) -> str:
        if token not in self._names:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = self._raw(token) if "\ufffd" in text else None
            self._names[token] = text if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._names[token]

    def bytes(self, token: int) -> List[int]:
        raw = self._raw(token)
        return raw if raw is not None else list(self.name(token).encode("utf-8"))

    def _raw(self, token: int) -> Optional[List[int]]:
        """The bytes of a token where the tokenizer says them: a byte token's, a byte-level BPE
        token's (not an added token's: its text is its own, not written byte by byte)."""
        if isinstance(self.tokenizer, tiny.ByteTokenizer):
            return [token - self.tokenizer.offset] if token >= self.tokenizer.offset else None
        piece = getattr(self.tokenizer, "convert_ids_to_tokens", lambda t: "")(token)
        piece = piece if isinstance(piece, str) else ""
        found = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if found:
            return [int(found.group(1), 16)]
        table = self._byte_level
        if table is None or not piece or token in getattr(self.tokenizer, "added_tokens_decoder", {}):
            return None
        raw = [table.get(c) for c in piece]
        return None if None in raw else raw


def byte_level_table(tokenizer) -> Optional[Dict[str, int]]:
    """The byte each character of a byte-level BPE token stands for, where ``tokenizer`` is one
    (its decoder, or one of a sequence of decoders, is ``tokenizers``' ByteLevel), else None.

    Byte-level BPE writes each byte as one printable character: the bytes that are printable
    Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) as themselves, the other 68
    (controls, the space, the soft hyphen, ...) as the characters from U+0100 on, in byte order."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        spec = json.loads(decoder.__getstate__()) if decoder is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
    if not _has_byte_level(spec):
        return None
    table, moved = {}, 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            table[chr(b)] = b
        else:
            table[chr(0x100 + moved)] = b
            moved += 1
    return table


def _has_byte_level(spec) -> bool:
    """Whether a decoder's JSON is ByteLevel, or a Sequence holding one."""
    if not isinstance(spec, dict):
        return False
    return spec.get("type") == "ByteLevel" or any(_has_byte_level(d) for d in spec.get("decoders") or ())


def completion_logprobs(scored: Scored, names: Names, echoed: int, start: int) -> dict:
    """OpenAI's legacy completions ``logprobs`` of ``scored``, whose first ``echoed`` tokens are
    the prompt's: each position's k top tokens (a string -> its log probability), the chosen one
    added when not among them; ``text_offset``: where each token's text begins in the choice's
    "text" (:func:`text_offsets`; the prompt's from 0, the completion's from ``start``: the
    length of the prompt echoed before it, else 0)."""
    head, tail = scored.tokens[:echoed], scored.tokens[echoed:]
    offsets = text_offsets(names.tokenizer, head, 0) + text_offsets(names.tokenizer, tail, start)
    return _completion_entries(scored, names, offsets)


def _completion_entries(scored: Scored, names: Names, offsets: List[int]) -> dict:
    tops = []
    for t, chosen, top in zip(scored.tokens, scored.chosen, scored.top):
        if top is None:
            tops.append(None)
            continue
        entries = {names.name(i): v for i, v in top}
        entries.setdefault(names.name(t), chosen)
        tops.append(entries)
    return {"tokens": [names.name(t) for t in scored.tokens], "token_logprobs": scored.chosen,
            "top_logprobs": tops, "text_offset": offsets}


def text_offsets(tokenizer, tokens: List[int], start: int) -> List[int]:
    """Where the text of each of ``tokens`` begins, from ``start``: the length of the decoding
    of the tokens before it (special tokens left out, as the answer's text) that the decoding
    of them all keeps: a character whose bytes are not all there yet counts once they are (a
    token holding a character's second byte starts where its first did), or as the U+FFFD it
    stays. Decoded incrementally as a streamed answer is (:class:`serve_stream.RowText`), not
    each prefix whole: that cost grew with the square of the length of an echoed prompt."""
    row, seen = serve_stream.RowText(tokenizer, (), None, ()), []
    for token in tokens:
        seen.append(_before(row))
        row.add(token)
    return _offsets(seen, row.previous, start)


def _before(row: serve_stream.RowText) -> tuple:
    """What :func:`_offsets` needs of the decoding before a token: its length and last
    characters (a character takes at most 4 bytes)."""
    return len(row.previous), row.previous[-8:]


def _offsets(seen: List[tuple], final: str, start: int) -> List[int]:
    return [start + k - len(tail) + len(serve_stream.common_prefix(tail, final[k - len(tail):k]))
            for k, tail in seen]


def chat_logprobs(scored: Scored, names: Names) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": names.name(token), "logprob": logprob, "bytes": names.bytes(token)}
    return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in top]}
                        for t, v, top in zip(scored.tokens, scored.chosen, scored.top)]}


# -- streamed: each token's log probabilities as model.generate makes it ------------------------

class Steps:
    """The log probabilities of each token model.generate picks for the batch rows ``rows``
    (indices), taken as it runs: a forward hook on ``model`` keeps the last position's
    ``log_softmax`` of each call's logits (float32, as :func:`score`'s: the model's own, before
    the logits processors: temperature, top-p / top-k / min-p, the repetition penalty) and the
    ``k`` likeliest tokens; :meth:`take`, given a step's tokens (a streamer's ``put``), reads the
    oldest call's. One call per step, in order (the first, the prompt's, gives the first token;
    a call whose tokens never come, as transformers' deferred stop check makes, is left). Remove
    the hook with :meth:`close`."""

    def __init__(self, model, rows: List[int], k: int):
        self.rows, self.k, self._kept = list(rows), k, []
        self._hook = model.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        lp = torch.log_softmax(logits[self.rows, -1].float(), dim=-1)
        values, ids = lp.topk(min(self.k, lp.shape[-1]), dim=-1)
        self._kept.append((lp, ids.tolist(), values.tolist()))

    def take(self, tokens: List[int]) -> Dict[int, tuple]:
        """Each row's ``(chosen log probability, [(id, log probability)] top first)`` for a
        step's ``tokens`` (one per batch row)."""
        lp, ids, values = self._kept.pop(0)
        chosen = lp[torch.arange(len(self.rows)), torch.tensor([tokens[r] for r in self.rows])].tolist()
        return {r: (chosen[j], list(zip(ids[j], values[j]))) for j, r in enumerate(self.rows)}

    def close(self) -> None:
        self._hook.remove()


class Streamed:
    """One streamed row's log probabilities, token by token (:meth:`add`: a token of its
    completion, its log probability, its ``k`` top tokens), given out with the text:
    :meth:`ready` gives the entries of the tokens whose text the stream sent, :meth:`rest` the
    others up to the row's token count once it ends. Concatenated, they are what
    :func:`completion_logprobs` (``chat``: :func:`chat_logprobs`) gives for the row's scored
    tokens, ``text_offset`` counted from the start of the text across chunks: a token's offset
    is given once its text is sent (the decoding before it no longer changes there), from
    ``start`` (the length of a prompt echoed before the completion)."""

    def __init__(self, names: Names, k: int, chat: bool, pad_id: Optional[int], start: int = 0):
        self.names, self.k, self.chat, self.pad_id, self.start = names, k, chat, pad_id, start
        self.scored = Scored([], [], [])
        self.row = serve_stream.RowText(names.tokenizer, (), None, ())  # as text_offsets decodes
        self.seen: List[tuple] = []  # _before each token
        self.ends: List[int] = []  # the length of the decoding after each token
        self.given = 0

    def add(self, token: int, chosen: float, top: List[tuple]) -> None:
        self.scored.tokens.append(token)
        self.scored.chosen.append(chosen)
        self.scored.top.append(top[:self.k])
        self.seen.append(_before(self.row))
        self.row.add(token)
        self.ends.append(len(self.row.previous))

    def ready(self, sent: int) -> Optional[dict]:
        """The entries of the tokens not given yet whose text ends within the first ``sent``
        characters of the text sent (a trailing pad token waits: one that ends the row is not
        counted); None if none."""
        n = self.given
        while n < len(self.ends) and self.ends[n] <= sent:
            n += 1
        while n > self.given and self.scored.tokens[n - 1] == self.pad_id:
            n -= 1
        return self._chunk(n)

    def rest(self, count: int) -> Optional[dict]:
        """The entries of the row's tokens not given yet, up to its first ``count`` (Served.finish's)."""
        return self._chunk(max(count, self.given))

    def _chunk(self, n: int) -> Optional[dict]:
        if n <= self.given:
            return None
        part = slice(self.given, n)
        scored = Scored(self.scored.tokens[part], self.scored.chosen[part], self.scored.top[part])
        offsets = _offsets(self.seen[part], self.row.previous, self.start)
        self.given = n
        return chat_logprobs(scored, self.names) if self.chat else _completion_entries(scored, self.names, offsets)
