"""Position ids of the tokens after a prefix (numbered from its length, as PEFT numbers
them), per family, and the checks that refuse to run past a learned position table."""
from __future__ import annotations

from typing import Optional

import torch


# Models whose forward numbers the tokens from the attention mask when no position_ids are
# given (OPT: cumsum of the mask, pads skipped) rather than from the cache position as the
# others do; with PEFT's P ones in front of that mask, their real tokens count from P.
_MASK_NUMBERED = frozenset({"opt"})
# Models whose forward numbers the tokens 0..S-1 when no position_ids are given, whatever the
# cache holds (EuroBERT): behind PEFT's prefix they keep that numbering.
_CACHE_BLIND = frozenset({"eurobert"})


def _padding_numbered(model) -> Optional[int]:
    """The ``padding_idx`` of a model that numbers its tokens from the non-pad input ids
    (RoBERTa and its kind: position = padding_idx + 1 + i over real tokens, pads at
    padding_idx), found once per model; None for the others."""
    found = model.__dict__.get("_prefix_attn_padding_idx")
    if found is None:
        found = -1
        for m in model.modules():
            if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
                found = m.padding_idx
                break
        model.__dict__["_prefix_attn_padding_idx"] = found
    return None if found < 0 else found


def _positions_after_prefix(model, kwargs, S, row_lens, device, uniform: bool = False):
    """``position_ids`` of the tokens after each row's prefix, numbered from its length P as
    PEFT numbers them: the given ones + P; else the model's own default + P (the cache
    position for most families; for ``_MASK_NUMBERED`` ones the real tokens counted from P
    over the mask, pads -1, as they count them behind PEFT's P ones; None, the model's own
    numbering, for ``_CACHE_BLIND`` ones). ``uniform``: every row
    has the same prefix length (known on the host)."""
    pos = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if pos is None and model_type in _CACHE_BLIND:
        return None
    pad = _padding_numbered(model) if pos is None else None
    if pad is not None:
        ids = kwargs.get("input_ids")
        if ids is None:  # from embeddings these models number 1.. without the cache: as PEFT gets
            return None
        real = ids.ne(pad).long()
        past = _cache_length(kwargs)
        return (real.cumsum(1) + past + row_lens[:, None]) * real + pad
    if pos is None and model_type in _MASK_NUMBERED and mask is not None and mask.dim() == 2:
        m = mask.to(device=device, dtype=torch.long)
        pos = (m.cumsum(1) * m - 1)[:, -S:]
        return torch.where(m[:, -S:] > 0, pos + row_lens[:, None], pos)
    if pos is None:
        past = _cache_length(kwargs)
        pos = torch.arange(past, past + S, device=device)[None, :]
    if pos.shape[0] == 1 and uniform:
        # one length for every row: keep [1, S] so RoPE tables are not built per row
        return pos + row_lens[0]
    return pos + row_lens[:, None]


def _pads_inside_the_table(model, kwargs, S: int, pos, P: int):
    """``pos`` with the pad tokens' positions (0 in a 2-D ``attention_mask``) kept inside the
    model's position table. A right-padded row behind a long prefix numbered its pads past the
    table while its real tokens fit: a batch mixing it with a longer row of a shorter prefix
    was refused (or an IndexError), though each row alone ran. A pad's position reaches only
    its own (masked) output, so real tokens are unchanged. Only when the bound
    prefix + cache + tokens passes the table (no extra op in the common case)."""
    limit = learned_position_limit(model)
    mask = kwargs.get("attention_mask")
    if limit is None or not P or pos is None or not isinstance(mask, torch.Tensor) \
            or mask.dim() != 2 or mask.shape[-1] < S or P + _cache_length(kwargs) + S <= limit:
        return pos
    real = mask[:, -S:].to(device=pos.device, dtype=torch.bool)
    return torch.where(real, pos, pos.clamp(max=limit - 1))


def learned_position_limit(model) -> Optional[int]:
    """How many positions ``model``'s text position table holds: a table of learned embeddings
    (GPT-2's and GPT-BigCode's ``wpe``, OPT's and BioGPT's ``embed_positions`` less their
    offset, BERT's ``position_embeddings``) or a fixed sin/cos table the model indexes by
    position (GPT-J's and CodeGen's ``embed_positions``, CTRL's ``pos_encoding``); None for
    models without one (rotary and the like, which run past their nominal length instead of
    failing). Only the text's table counts: a vision tower's patch positions (CLIP, SigLIP) are
    not the tokens'. Cached on the model."""
    return _position_table(model)[0]


def _position_table(model) -> tuple:
    """``(limit, kind)`` of :func:`learned_position_limit` (kind "learned" or "fixed")."""
    cached = model.__dict__.get("_prefix_attn_position_table")
    if cached is not None:
        return cached
    scope = _text_scope(model)
    table = (None, "")
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(scope) and isinstance(m, torch.nn.Embedding) \
                and ("pos" in leaf or leaf == "wpe"):
            table = (m.num_embeddings - int(getattr(m, "offset", 0) or 0), "learned")
            break
    else:
        for name, b in model.named_buffers():
            if name.startswith(scope) and name.rsplit(".", 1)[-1] in _FIXED_TABLES and b.dim() == 2:
                table = (b.shape[0], "fixed")
                break
    model.__dict__["_prefix_attn_position_table"] = table
    return table


# sin/cos tables that a model indexes by position id (an IndexError past their end)
_FIXED_TABLES = ("embed_positions", "pos_encoding")


def _text_scope(model) -> str:
    """The module path that holds the token embeddings' siblings ("transformer.", "model.",
    "model.language_model."; "" when it cannot be told): where the text's position table is."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is None:
        return ""
    for name, m in model.named_modules():
        if m is emb:
            return name.rsplit(".", 1)[0] + "." if "." in name else ""
    return ""


def _check_positions(model, S: int, kwargs, P: int) -> None:
    """A clear error instead of the embedding's IndexError when the tokens after a prefix run
    past a learned position table (they are numbered from the prefix's length, as PEFT does).
    Only for such models, and the position ids are read back only when the bound
    prefix + cache + tokens passes the table (padding makes the real positions smaller)."""
    limit = learned_position_limit(model)
    if limit is None or not P:
        return
    past = _cache_length(kwargs)
    pos = kwargs.get("position_ids")
    if P + past + S <= limit or pos is None:
        return
    top = int(pos.max()) if pos.numel() else 0
    if top >= limit:
        raise ValueError(f"{S} tokens after a cache of {past} and a prefix of {P} take positions "
                         f"up to {top}, {_past_the_table(model, limit)}: shorten the input or "
                         "the prefix")


def _past_the_table(model, limit: int) -> str:
    return (f"beyond the {limit} {position_words(model)} of {type(model).__name__} (tokens "
            "after a prefix are numbered from its length, as PEFT numbers them)")


def position_words(model) -> str:
    """ "learned positions" or "positions of its sin/cos table", for errors."""
    return "learned positions" if _position_table(model)[1] == "learned" else \
        "positions of its sin/cos table"


def _cache_length(kwargs) -> int:
    """Positions already in the KV cache of this forward (0 without one)."""
    # transformers >= 5.2x calls it `cache`, earlier 5.x releases `past_key_values`
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
