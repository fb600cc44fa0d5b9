"""``GenerationMixin.generate`` with ``prefixes=``: names become bank ids before generate
expands its inputs, the bank is pinned for the call, assistants of assisted generation draft
without prefixes, and a generate that would pass a learned position table is refused."""
from __future__ import annotations

import contextvars
import functools
from typing import Optional

import torch

from .hooks import _from_numpy, _rows_for
from .names import PREFIXES_KWARG
from .positions import _past_the_table, learned_position_limit


def _check_generate_positions(model, bank, args, kwargs) -> None:
    """Before a generate on a model with learned positions (GPT-2, OPT, ...): refuse one whose
    last token would pass the position table (else it fails at the step that crosses it).
    A lower bound on the position reached (each row's prefix + real tokens + new tokens), so
    it never refuses a generate that fits."""
    limit = learned_position_limit(model)
    ids = kwargs.get(PREFIXES_KWARG)
    tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if limit is None or not isinstance(ids, torch.Tensor) or ids.dim() != 1 \
            or not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 \
            or ids.shape[0] != tokens.shape[0]:
        return
    # as generate reads its settings: the call's keyword, else the generation_config passed,
    # whose unset fields it fills from the model's; a max_new_tokens wins over max_length
    configs = [c for c in (kwargs.get("generation_config"), getattr(model, "generation_config", None))
               if c is not None]

    def setting(name):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    def field(name):
        """(value, how to name it) of a length setting."""
        value = setting(name)
        where = "" if kwargs.get(name) is not None else " of the generation config"
        return value, f"{name}={value}{where}"

    new, asked = field("max_new_tokens")
    given = "max_new_tokens"
    if new is None:
        length, asked = field("max_length")
        if length is None:
            return
        new, given = int(length) - tokens.shape[1], "max_length"
        asked = f"{asked}: {new} new tokens"
    if int(new) < 1:
        return
    entries = list(bank._snapshot()[1].values())  # the pinned snapshot the ids index
    lens = [entries[i].length if 0 <= i < len(entries) else 0 for i in ids.tolist()]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask.sum(-1).tolist()
    else:  # generate infers the mask from pad tokens: the others, a lower bound either way
        pad = setting("pad_token_id")
        real = (tokens != pad).sum(-1).tolist() if isinstance(pad, int) \
            else [tokens.shape[1]] * len(lens)
    # positions used: the prefix, the prompt's real tokens and every new token but the last
    # (which is never fed back)
    top = max(P + int(n) for P, n in zip(lens, real)) + int(new) - 1
    if top > limit:
        raise ValueError(f"generate would reach position {top - 1} (a prefix, the prompt's tokens "
                         f"and {asked}), {_past_the_table(model, limit)}: shorten the prompt, the "
                         f"prefix or {given}")


def _generate_batch_size(args, kwargs) -> Optional[int]:
    for t in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"),
              kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[0]
    return None


def _one_per_row(prefixes, args, kwargs):
    """An id tensor of one element (``tensor(3)``, ``tensor([3])``) repeated for each row of the
    batch: generate expands tensor keywords with the rows (beams, ``num_return_sequences``),
    which a single id would not follow. Anything else as is."""
    if isinstance(prefixes, torch.Tensor) and prefixes.dim() <= 1 and prefixes.numel() == 1:
        B = _generate_batch_size(args, kwargs)
        if B is not None:
            return prefixes.reshape(1).repeat(B)
    return prefixes


# (assistant model, bank of the model it drafts for) while an assisted generate runs: the
# assistant's own generate call is told apart from any other generate run meanwhile (a guard
# model's called from a logits processor, another bank's pinned block), whose ids are its own
_ASSISTING: contextvars.ContextVar = contextvars.ContextVar("prefix_attn_assisting", default=None)


def _wrap_generate(generate):
    """``GenerationMixin.generate`` for models with a prefix bank and ``prefixes=``: the names
    become an id tensor ``[B]`` before generate starts (generate then expands it with the rows,
    for beams and ``num_return_sequences``, as it does every tensor keyword; a list it would
    pass on unexpanded), checked against the batch before it is expanded, and the bank is
    pinned for the whole call (a request keeps its prefixes while other tenants change the
    bank). ``prefixes=`` on a model without any bank raises (transformers would pass it on to
    attention functions that ignore it), except on the assistant model of an assisted
    generate, which drafts without them. Anything else: generate unchanged."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        prefixes = kwargs.get(PREFIXES_KWARG)
        if prefixes is None:
            bank = None if PREFIXES_KWARG in kwargs else _bank_with_a_default(self)
            if bank is None:
                return generate(self, *args, **kwargs)
            with bank.pinned():  # the default and the entries of one moment, for the whole call
                default = bank._default_in_call()
                if default is None:
                    return generate(self, *args, **kwargs)
                return wrapper(self, *args, **kwargs, **{PREFIXES_KWARG: default})
        prefixes = kwargs[PREFIXES_KWARG] = _one_per_row(_from_numpy(prefixes), args, kwargs)
        assisting = _ASSISTING.get()
        # the assistant as given may wrap the model whose generate runs (torch.compile's
        # OptimizedModule, a PeftModel): it is one of its modules
        drafts_for = assisting[1] if assisting is not None and any(
            m is self for m in assisting[0].modules()) else None
        bank = _bank_of(self)
        if bank is None:
            if drafts_for is not None:
                # the assistant model of assisted generation: it drafts without the prefixes,
                # the main model verifies every drafted token with them (the output stays exact)
                kwargs.pop(PREFIXES_KWARG)
                return generate(self, *args, **kwargs)
            raise ValueError(
                f"generate(prefixes=...) on a {type(self).__name__} without a prefix bank: the "
                "prefixes would be ignored; attach one first (prefix_attn.PrefixBank.attach(model) "
                "or prefix_attn.prefix_tuning(model, ...))")
        # a bank on a submodule (the language model of a VLM): its own hook reads the ids
        if drafts_for is not None and isinstance(prefixes, torch.Tensor):
            prefixes = _ids_of_an_outer_bank(bank, prefixes, drafts_for)
            if prefixes is None:  # names this bank lacks: it drafts without prefixes
                kwargs.pop(PREFIXES_KWARG)
                return generate(self, *args, **kwargs)
            kwargs[PREFIXES_KWARG] = prefixes
        assistant = kwargs.get("assistant_model")
        token = _ASSISTING.set((assistant, bank)) if assistant is not None else None
        try:
            with bank.pinned():
                B = _generate_batch_size(args, kwargs)
                if B is not None:
                    # checked against the batch before generate expands it (else its errors
                    # name the expanded rows), and kept on the host: each step reads the
                    # (expanded) ids back without a device sync
                    rows = prefixes if isinstance(prefixes, torch.Tensor) else _rows_for(prefixes)
                    kwargs[PREFIXES_KWARG] = bank.ids(rows, B, device="cpu")
                _check_generate_positions(self, bank, args, kwargs)
                return generate(self, *args, **kwargs)
        finally:
            if token is not None:
                _ASSISTING.reset(token)

    wrapper._prefix_attn_wrapped = True
    return wrapper


def _bank_of(model):
    """The prefix bank of ``model``, or of a submodule (the language model of a vision-language
    model); None without one (and for a ``GenerationMixin`` that is no ``nn.Module``, such as
    optimum's ONNX Runtime models)."""
    if not isinstance(model, torch.nn.Module):
        return None
    bank = model.__dict__["_modules"].get("prefix_bank")
    if bank is None:
        from ..bank import PrefixBank

        bank = next((m for m in model.modules() if isinstance(m, PrefixBank)), None)
    return bank


def _bank_with_a_default(model):
    """:func:`_bank_of` ``model`` if it has a default prefix, else None."""
    bank = _bank_of(model)
    return bank if bank is not None and bank.default_prefix is not None else None


def _ids_of_an_outer_bank(bank, ids: torch.Tensor, outer) -> Optional[torch.Tensor]:
    """``ids`` for ``bank``, in an assistant model's generate: the wrapper of the main model
    (whose bank is ``outer``) turned its names into ids of *that* bank; the same names in this
    bank (None when this bank lacks one of them: the assistant drafts without prefixes, and
    the main model verifies every token with them, so the output stays exact)."""
    if outer is bank:
        return ids
    names = list(outer._snapshot()[1])  # as the main model's generate pinned it
    rows = [names[i] if 0 <= i < len(names) else None for i in ids.tolist()]
    if any(r is not None and r not in bank for r in rows):
        return None
    return bank.ids(rows, len(rows), device="cpu")
