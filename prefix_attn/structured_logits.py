"""The grammars of :mod:`prefix_attn.structured` applied while generating: :class:`Grammars`
compiles each constraint's schema once (an LRU of compiled grammars by schema text, the
tokenizer's xgrammar TokenizerInfo built once) and gives a batch its :class:`RowGrammars`, a
transformers LogitsProcessor holding one xgrammar GrammarMatcher per row (None: a row not
constrained, left as it is). Imports torch, transformers and xgrammar."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from . import tiny
from .structured import ANY_WHITESPACE, Constraint


def tokenizer_info(tokenizer, vocab_size: int, stop: Sequence[int]) -> "xgr.TokenizerInfo":
    """xgrammar's view of ``tokenizer`` for logits of ``vocab_size`` (the model's, which may
    exceed the tokenizer's): the byte tokenizer's bytes as raw tokens, an HF tokenizer's as
    xgrammar reads them; ``stop`` the ids that end an answer (the only ones a finished grammar
    allows)."""
    if isinstance(tokenizer, tiny.ByteTokenizer):
        vocab = [b""] * tokenizer.offset + [bytes([b]) for b in range(256)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop))
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop))


class Grammars:
    """The compiled grammars of one tokenizer: the ``size`` most recently used, by schema text."""

    def __init__(self, tokenizer, vocab_size: int, stop: Sequence[int], size: int = 64):
        if not stop:
            raise ValueError("structured output needs a stop id (the model's eos_token_id) to end the answer")
        self.info = tokenizer_info(tokenizer, vocab_size, stop)
        self.clean = clean_bitmask(self.info)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # ours is the cache
        self.size = size
        self._compiled: "OrderedDict[str, xgr.CompiledGrammar]" = OrderedDict()

    def compiled(self, schema: str) -> "xgr.CompiledGrammar":
        grammar = self._compiled.pop(schema, None)
        if grammar is None:
            grammar = self.compiler.compile_json_schema(schema, any_whitespace=ANY_WHITESPACE)
        self._compiled[schema] = grammar
        while len(self._compiled) > self.size:
            self._compiled.popitem(last=False)
        return grammar

    def processor(self, constraints: Sequence[Optional[Constraint]], prompt_len: int) -> "RowGrammars":
        """The processor of a batch whose row i has ``constraints[i]`` (None: free), its input
        ``prompt_len`` tokens long (left padded)."""
        matchers = [None if c is None else xgr.GrammarMatcher(self.compiled(c.schema)) for c in constraints]
        return RowGrammars(matchers, self.info.vocab_size, prompt_len, self.clean)


def clean_bitmask(info: "xgr.TokenizerInfo") -> torch.Tensor:
    """xgrammar's token bitmask (int32 words, bit i of word w: token 32 w + i) of the tokens
    whose bytes hold no control character (U+0000..U+001F). JSON has none outside its
    whitespace (none in the compact grammar) and none unescaped in a string, yet xgrammar 0.2.9
    lets a string with "minLength" / "maxLength" take any but '"', '\\', CR and LF: an answer
    that was no JSON (json.loads: "Invalid control character")."""
    words, special = [0xFFFFFFFF] * ((info.vocab_size + 31) // 32), set(info.special_token_ids)
    for token, text in enumerate(info.decoded_vocab):
        if token not in special and any(b < 0x20 for b in text):
            words[token // 32] &= ~(1 << (token % 32))
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


class RowGrammars(LogitsProcessor):
    """Each constrained row's logits masked to the tokens its grammar allows next; each matcher
    advanced by its row's chosen token. A row whose grammar is complete allows only the stop ids
    (so it ends); a row that ended otherwise (its stop text, its client gone: padding follows) has
    its matcher dropped and is left alone. One row per matcher: no beams (refused before),
    no num_return_sequences (the server's "n" gives rows of their own).

    transformers applies a given processor after its own (repetition penalty, temperature,
    top-k, top-p, min-p): where those leave a row none of the tokens its grammar allows, the
    next token is drawn among the allowed ones alike (greedy: the first)."""

    def __init__(self, matchers: List[Optional["xgr.GrammarMatcher"]], vocab_size: int, prompt_len: int,
                 clean: Optional[torch.Tensor] = None):
        self.matchers, self.prompt_len, self.clean = matchers, prompt_len, clean
        self.bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
        self.vocab_size = vocab_size

    def _advance(self, input_ids: torch.LongTensor) -> None:
        """Each matcher given its row's last token (none before the first new one)."""
        if input_ids.shape[1] <= self.prompt_len:
            return
        last = input_ids[:, -1].tolist()
        for i, matcher in enumerate(self.matchers):
            if matcher is not None and (not matcher.accept_token(last[i]) or matcher.is_terminated()):
                self.matchers[i] = None  # ended: its stop id accepted, or padding after another stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise ValueError(f"{input_ids.shape[0]} rows for {len(self.matchers)} grammars (beams or "
                             "num_return_sequences are not served with structured output)")
        self._advance(input_ids)
        rows = [i for i, m in enumerate(self.matchers) if m is not None]
        if not rows:
            return scores
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        if self.clean is not None:  # no control character (a grammar allowing only those keeps them)
            kept = self.bitmask[rows] & self.clean
            self.bitmask[rows] = torch.where(kept.any(dim=-1, keepdim=True), kept, self.bitmask[rows])
        bitmask = self.bitmask.to(scores.device, non_blocking=True)
        width = min(self.vocab_size, scores.shape[-1])
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=width, indices=rows)
        empty = torch.isneginf(scores[rows]).all(dim=-1).tolist()  # one read-back a step, not one a row
        emptied = [i for i, e in zip(rows, empty) if e]
        if emptied:  # the sampling filters kept none of the allowed tokens: all allowed alike
            allowed = torch.zeros(len(emptied), scores.shape[-1], device=scores.device, dtype=scores.dtype)
            xgr.apply_token_bitmask_inplace(allowed, bitmask[emptied], vocab_size=width)
            scores[emptied] = allowed
        return scores
