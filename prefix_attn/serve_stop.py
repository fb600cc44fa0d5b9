"""Where a completion of ``prefix-attn generate`` ends: at the first stop id (the model's end of
sequence), at the first stop text (``--stop``, matched in the decoded completion and left out of
it, as OpenAI's ``stop`` is) or after ``--max-new-tokens``. :class:`StopTexts` ends a row's
generation at its stop text (per row of a batch, per beam), :func:`finish` cuts the text and
says why it ended."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from transformers import StoppingCriteria


def until_stop_id(new: Sequence[int], stop_ids: Sequence[int], pad_id: Optional[int]) -> Tuple[List[int], bool]:
    """The tokens of ``new`` (a row's generated ids) before its first stop id, the padding
    after them left out (model.generate's filler once a stopping criterion ended the row; a
    pad token the model generated before other tokens is one of them), and whether a stop id
    ended them."""
    end = next((i for i, t in enumerate(new) if t in stop_ids), None)
    kept = list(new if end is None else new[:end])
    while kept and kept[-1] == pad_id:
        kept.pop()
    return kept, end is not None


def _decode(tokenizer, tokens: Sequence[int], special: bool = False) -> str:
    """The text of ``tokens``, special tokens left out (``special``: kept, for a tool-call
    parser, :mod:`prefix_attn.tool_calls`)."""
    return tokenizer.decode(list(tokens), skip_special_tokens=not special)


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the first of ``stops`` starts in ``text`` (None: none is there)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class StopTexts(StoppingCriteria):
    """A row is done once the text of its new tokens (those after the first ``prompt_len``, up to
    a stop id, padding and special tokens left out: what :func:`finish` decodes) holds one of
    ``stops``. Works with any tokenizer that decodes a list of ids (prefix_attn's byte tokenizer
    and transformers' alike); called on every row of the batch, beams included (``input_ids``:
    ``(rows, prompt_len + new)``, left padded); ``special``: special tokens kept in the text,
    as :func:`finish`'s."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int, stop_ids: Sequence[int],
                 pad_id: Optional[int], special: bool = False):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len
        self.stop_ids, self.pad_id, self.special = list(stop_ids), pad_id, special
        # the tokens a stop text that the newest token completes can span, with room: a character
        # may take 4 byte tokens, and the window's first token may decode otherwise alone (a
        # SentencePiece word's space); a row would have stopped at an earlier stop text
        self.window = 4 * (max(len(s) for s in self.stops) + 1) + 8

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # only the last ``window`` new tokens: decoding each row's whole completion at every
        # step took 1.1 s over 1024 steps of 8 rows with a BPE tokenizer (0.14 s so), growing
        # with the square of the length. A row with a stop id before the window ended there:
        # model.generate keeps it finished whatever is said of it now.
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        done = [self.holds_stop(row) for row in input_ids[:, start:].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def holds_stop(self, new: Sequence[int]) -> bool:
        """Whether ``new`` (a row's last new tokens) holds a stop text before any stop id.
        :func:`finish` reads the whole text."""
        tokens, _ = until_stop_id(new, self.stop_ids, self.pad_id)
        return _first_stop(_decode(self.tokenizer, tokens, self.special), self.stops) is not None


def finish(tokenizer, new: Sequence[int], stop_ids: Sequence[int], pad_id: Optional[int],
           stops: Sequence[str], special: bool = False) -> Tuple[str, int, str]:
    """``(completion, num_tokens, finish_reason)`` of a row's generated ids ``new``. The
    completion is the text before the first stop id and, within it, before the first stop text.
    ``num_tokens`` counts the tokens generated for it: none after a stop id, the stop id itself
    not counted; with a stop text, the tokens up to the one that completed it (their text may go
    past the completion: the stop text and anything the same token held after it).
    ``finish_reason`` is ``"stop"`` (a stop id or a stop text) or ``"length"`` (neither: the
    tokens ran out). ``special``: the text keeps its special tokens (a tool-call parser reads it)."""
    tokens, stopped = until_stop_id(new, stop_ids, pad_id)
    text = _decode(tokenizer, tokens, special)
    cut = _first_stop(text, stops) if stops else None
    if cut is None:
        return text, len(tokens), "stop" if stopped else "length"
    count = len(tokens)  # the first count tokens hold a stop text; fewer may too (a batch ran on)
    while count > 1 and _first_stop(_decode(tokenizer, tokens[:count - 1], special), stops) is not None:
        count -= 1
    return text[:cut], count, "stop"
