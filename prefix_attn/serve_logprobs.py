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
    holding a scored token's logits are kept where the model takes ``logits_to_keep``."""
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
