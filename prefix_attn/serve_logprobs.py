"""Log probabilities for ``prefix-attn serve`` ("logprobs", "top_logprobs", "echo"): the tokens of
each answer scored by one more forward pass of prompt + completion after the request's prefix,
every scored request of a batch in one call (:func:`score`), and their entries in the shapes of
OpenAI's API: the legacy completions' ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`` (:func:`completion_logprobs`) and chat's ``{"content": [...]}``
(:func:`chat_logprobs`).

The log probabilities are the model's own distribution given the prefix and the tokens before:
``log_softmax`` of its logits in float32, before temperature, top-p / top-k / min-p and the
repetition penalty (vLLM's default). A token's string is the token decoded alone (special tokens
kept); a token that is part of a UTF-8 character (it decodes alone to U+FFFD) is
``"bytes:\\xNN..."``, its own bytes as OpenAI writes them, where the tokenizer says them
(prefix-attn's byte tokenizer, a ``<0xNN>`` byte token), else that decoding with U+FFFD; chat's
"bytes" are the token's own bytes, or the UTF-8 of its string."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import serve_stream, tiny


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
    holding a scored token's logits are kept where the model takes ``logits_to_keep``."""
    ids, mask = tiny.left_pad([r.prompt + r.completion for r in rows], pad_id)
    width = ids.shape[1]
    keep = max(len(r.prompt) + len(r.completion) - r.first for r in rows) + 1
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in _forward_params(model) else {}
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


def _forward_params(model) -> set:
    return set(inspect.signature(model.forward).parameters)


class Names:
    """A tokenizer's strings of single tokens: ``name`` (the token decoded alone, special tokens
    kept) and ``bytes``, each decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._names: Dict[int, str] = {}

    def name(self, token: int) -> str:
        if token not in self._names:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = self._raw(token) if "\ufffd" in text else None
            self._names[token] = text if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._names[token]

    def bytes(self, token: int) -> List[int]:
        name = self.name(token)
        raw = self._raw(token) if name.startswith("bytes:") else None
        return raw if raw is not None else list(name.encode("utf-8"))

    def _raw(self, token: int) -> Optional[List[int]]:
        """The bytes of a token that is part of a character, where the tokenizer says them."""
        if isinstance(self.tokenizer, tiny.ByteTokenizer):
            return [token - self.tokenizer.offset] if token >= self.tokenizer.offset else None
        piece = getattr(self.tokenizer, "convert_ids_to_tokens", lambda t: "")(token)
        found = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece if isinstance(piece, str) else "")
        return [int(found.group(1), 16)] if found else None


def completion_logprobs(scored: Scored, names: Names, echoed: int, prompt: str) -> dict:
    """OpenAI's legacy completions ``logprobs`` of ``scored``, whose first ``echoed`` tokens are
    the prompt's: each position's k top tokens (a string -> its log probability), the chosen one
    added when not among them; ``text_offset``: where each token's text begins in the choice's
    "text" (:func:`text_offsets`; the completion's from the end of ``prompt``, echoed before it)."""
    head, tail = scored.tokens[:echoed], scored.tokens[echoed:]
    offsets = text_offsets(names.tokenizer, head, 0) + text_offsets(names.tokenizer, tail, len(prompt) if echoed else 0)
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
        seen.append((len(row.previous), row.previous[-8:]))  # a character takes at most 4 bytes
        row.add(token)
    final = row.previous
    return [start + k - len(tail) + len(serve_stream.common_prefix(tail, final[k - len(tail):k]))
            for k, tail in seen]


def chat_logprobs(scored: Scored, names: Names) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": names.name(token), "logprob": logprob, "bytes": names.bytes(token)}
    return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in top]}
                        for t, v, top in zip(scored.tokens, scored.chosen, scored.top)]}
