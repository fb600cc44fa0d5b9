"""The ``AttentionMaskInterface`` entry of ``"prefix_attn"`` (:func:`padding_mask`): what
transformers' mask function becomes for the kernel (a padding mask, packed sequence ids, or
a dense mask for the fallback), and packed sequences found from the position ids."""
from __future__ import annotations

import inspect
import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..packed import sequence_ids
from .names import PACKED_ATTR


# What _closure_value gives for a function made inside torch.compile: dynamo reads no closure.
_UNREADABLE = object()


def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    try:
        closure = fn.__closure__
    except AttributeError:  # traced by dynamo: a function the graph made has no readable closure
        return _UNREADABLE
    if code is None or closure is None:
        return None
    for var, cell in zip(code.co_freevars, closure):
        if var == name:
            return cell.cell_contents
    return None


def _inner_code(outer):
    """The code of the one function that transformers' ``outer`` defines and returns (its
    ``inner_mask``), or None where that is not so (another transformers)."""
    codes = [c for c in inspect.unwrap(outer).__code__.co_consts if isinstance(c, types.CodeType)]
    return codes[0] if len(codes) == 1 else None


def _inner_codes() -> dict:
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return {}
    names = ("sliding_window_overlay", "packed_sequence_mask_function",
             "remap_positions_for_packed_sequence")  # the last: transformers 5.2x
    return {name: _inner_code(getattr(mu, name)) for name in names if hasattr(mu, name)}


# Read once here, not in a traced call: functions are told apart by their code object, which
# dynamo reads on every release (getattr(fn, "__qualname__", "") in a graph gave "" for a
# function the graph made, and torch 2.14 failed on a module-level one: no fullgraph).
_INNER_CODES = _inner_codes()


def _made_by(fn, outer: str) -> bool:
    """Whether ``fn`` is the function transformers' ``outer`` returns."""
    code = _INNER_CODES.get(outer)
    return code is not None and isinstance(fn, types.FunctionType) and fn.__code__ is code


def mask_pattern(mask_function, call: Optional[dict] = None) -> Optional[str]:
    """"causal" | "sliding" | "full" for the mask functions the kernel expresses, else None.

    Matches transformers' ``causal_mask_function``, ``bidirectional_mask_function`` and
    ``sliding_window_causal_mask_function(w)`` (= ``and_masks(sliding_window_overlay(w), causal)``).
    Inside torch.compile the last is made in the graph, where its closure cannot be read: then
    ``call`` (the mask interface's keywords) decides (:func:`_sliding_call`).
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "full"
    parts = _closure_value(mask_function, "mask_functions")
    if parts is _UNREADABLE:
        return "sliding" if call is not None and _sliding_call(call) else None
    if (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function
            and _made_by(parts[0], "sliding_window_overlay")):
        return "sliding"
    return None


def _sliding_call(call: dict) -> bool:
    """Whether transformers' call of the mask interface is that of its plain sliding-window
    causal mask, told from its keywords (for a mask function whose closure cannot be read):
    ``local_size`` is the config's sliding window (not a chunk size), no overlay (``use_vmap``
    off; packed sequences and block overlays turn ``allow_is_causal_skip`` off, which a
    compiled decode step of one query does too, where neither can change the mask), and not a
    bidirectional mask (those pass ``allow_is_bidirectional_skip``). Anything else: a dense
    mask, which is always right."""
    config, window = call.get("config"), call.get("local_size")
    return (window is not None and config is not None
            and getattr(config, "sliding_window", None) == window
            and not getattr(config, "attention_chunk_size", None)
            and not call.get("use_vmap", False)
            and "allow_is_bidirectional_skip" not in call
            and (call.get("allow_is_causal_skip", False) or call.get("q_length") == 1))


def packed_sequence_ids(mask_function, q_length, kv_length, q_offset, kv_offset):
    """The sequence ids ``[B, T]`` when ``mask_function`` is transformers' mask of packed
    sequences over a pattern the kernel expresses, else None.

    transformers builds it as ``and_masks(base, packed_sequence_mask_function(ids))``, where
    ``base`` may be wrapped by ``remap_positions_for_packed_sequence`` (5.2x) and is the
    causal, sliding or bidirectional function; any other overlay (or a cache offset) gives
    None. The returned tensor is marked (``PACKED_ATTR``) so the attention function tells it
    from a padding mask. Read inside torch.compile too: the mask function itself must not be
    called after its closure was read there (dynamo fails on it).
    """
    parts = _closure_value(mask_function, "mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2):  # _UNREADABLE too: a dense mask
        return None
    base, last = parts
    if not _made_by(last, "packed_sequence_mask_function"):
        return None
    ids = _closure_value(last, "packed_sequence_mask")
    if _made_by(base, "remap_positions_for_packed_sequence"):
        base = _closure_value(base, "mask_function")
    if (mask_pattern(base) is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2
            or q_length != kv_length or ids.shape[1] != kv_length or int(q_offset) != 0
            or int(kv_offset) != 0):
        return None
    ids = ids.to(torch.long).clone()
    setattr(ids, PACKED_ATTR, True)
    return ids


# id(position_ids) -> (weakref to it, its version, its sequence ids or None): one check per
# forward, not one per layer (every layer gets the same tensor). Kept small.
_PACKED_BY_POSITIONS: dict = {}


def packed_from_positions(position_ids, batch_size: int, length: int):
    """Sequence ids ``[1, T]`` when a single row's ``position_ids`` restart (several sequences
    packed without padding, e.g. ``DataCollatorWithFlattening``), else None: the rule of
    transformers' flash-attention path (one row, more than one position, a restart: a
    decrease, or the first position seen again, as after a one-token sequence; a gap or a
    repeat such as ``0, 1, 5, 6`` or ``0, 1, 1, 2`` is one sequence, as sdpa with a cache
    sees it), for forwards where transformers' mask ignores the packing (a cache exists, as
    in a training forward with ``use_cache`` left on). One host read per forward; none while
    compiling."""
    if (position_ids is None or batch_size != 1 or length < 2 or position_ids.dim() != 2
            or position_ids.shape != (1, length) or torch.compiler.is_compiling()):
        return None
    # an inference tensor has no version counter (and cannot change outside inference mode)
    stamp = (position_ids.data_ptr(),
             None if position_ids.is_inference() else position_ids._version)
    cached = _PACKED_BY_POSITIONS.get(id(position_ids))
    if cached is not None and cached[0]() is position_ids and cached[1] == stamp:
        return cached[2]
    ids = None
    restarts = (torch.diff(position_ids, dim=-1) < 0).any() \
        | ((position_ids == position_ids.min()).sum() > 1)
    if bool(restarts):
        ids = sequence_ids(position_ids)
    if len(_PACKED_BY_POSITIONS) >= 64:
        _PACKED_BY_POSITIONS.clear()
    _PACKED_BY_POSITIONS[id(position_ids)] = (weakref.ref(position_ids), stamp, ids)
    return ids


def _sdpa_skips_mask(attention_mask, q_length, kv_length, kv_offset, window) -> bool:
    """Whether transformers drops the causal mask for sdpa (``_ignore_causal_mask_sdpa``): not
    traced, no padding among the keys, one query or as many queries as keys, and the keys
    within the window. One host read of the mask."""
    if torch.compiler.is_compiling() or (q_length != 1 and q_length != kv_length):
        return False
    if window is not None and kv_length >= window:
        return False
    if attention_mask is None:
        return True
    kv_off = int(kv_offset)
    return bool(attention_mask[:, kv_off:kv_off + kv_length].all())


def _dense_mask(mu, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                attention_mask, device):
    """``sdpa_mask``'s dense bool mask ``[B, 1, q, kv]`` (its signature differs across 5.x)."""
    kw = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
              mask_function=mask_function, attention_mask=attention_mask,
              allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if "cache_position" in inspect.signature(mu.sdpa_mask).parameters:
        kw["cache_position"] = torch.arange(q_length, device=device) + int(q_offset)
    else:
        kw.update(q_length=q_length, q_offset=q_offset, device=device)
    return mu.sdpa_mask(**kw)


def padding_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None,
                 q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Optional[torch.Tensor] = None, device="cpu",
                 cache_position: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """The ``AttentionMaskInterface`` entry of ``"prefix_attn"``.

    attention_mask: bool ``[B, >= kv_offset + kv_length]`` (True = real token) or None.
    Returns None (no padding), a bool padding mask ``[B, kv_length]``, the marked sequence ids
    ``[B, kv_length]`` of packed rows (:func:`packed_sequence_ids`), or, for a pattern the
    kernel cannot express, the dense bool mask ``[B, 1, q_length, kv_length]`` of ``sdpa_mask``.
    Releases that pass ``cache_position`` ``[q_length]`` instead of q_length / q_offset work too.
    """
    from transformers import masking_utils as mu

    if (attention_mask is not None and attention_mask.dim() == 2 and int(kv_offset) > 0
            and attention_mask.shape[-1] < int(kv_offset) + kv_length):
        # already in key coordinates: our own output back again. generate builds a static
        # cache's masks before the forward (create_masks_for_generate), and a model whose
        # layers are all sliding passes the one 2-D mask on as its attention_mask; cut at
        # kv_offset a second time, its keys shifted (wrong tokens once a padded batch passed
        # the window). A padding mask of the whole sequence is never that short. (Told by
        # shape, not by a mark: inside torch.compile transformers' .to() of it is a new tensor.)
        return attention_mask.to(torch.bool)
    if q_length is None:
        if cache_position is None:
            raise TypeError("padding_mask needs q_length or cache_position")
        q_length, q_offset, device = cache_position.shape[0], cache_position[0], cache_position.device
    if mask_function is None:
        mask_function = mu.causal_mask_function
    seq_ids = packed_sequence_ids(mask_function, q_length, kv_length, q_offset, kv_offset)
    if seq_ids is not None:
        return seq_ids
    pattern = mask_pattern(mask_function, dict(kwargs, q_length=q_length))
    if pattern in ("causal", "sliding") \
            and getattr(kwargs.get("config"), "use_bidirectional_attention", False) \
            and not _sdpa_skips_mask(attention_mask, q_length, kv_length, kv_offset,
                                     kwargs.get("local_size")):
        # the layers are not causal (module.is_causal False) but transformers' mask is (Gemma
        # with use_bidirectional_attention, as in PaliGemma): a padding mask would lose the
        # causal part, so the dense mask, where sdpa gets it (where sdpa skips its mask, it
        # attends both ways, and so do we)
        pattern = None
    window = kwargs.get("local_size")
    if pattern == "sliding" and window is not None and kv_length <= int(window):
        # no key of this call is a window away from a query (the queries sit in the buffer):
        # the causal rules below apply (a static cache no longer than the window, the usual
        # case, took the dense fallback at every step, copying the prefix per row)
        pattern = "causal"
    kv_off = int(kv_offset)
    if (q_length == 1 and pattern == "causal" and isinstance(q_offset, torch.Tensor)
            and torch.compiler.is_compiling()):
        # a compiled decode step (static cache): q_offset stays a tensor (int() would break
        # the graph); masking the keys after the query is right whether or not it is aligned
        q_off, aligned, trim_future = q_offset, False, True
    else:
        q_off = int(q_offset)
        # The kernel's causal diagonal is bottom-right aligned: own key j is visible to query i
        # iff j <= kv_length - q_length + i, which is HF's kv_idx <= q_idx when offsets agree.
        aligned = q_off - kv_off == kv_length - q_length
        # A single query (decode on a static cache): keys after it are masked out as padding.
        trim_future = not aligned and q_length == 1 and pattern == "causal"
        # Several queries at the start of a longer buffer (a static cache's prefill): the keys
        # after the last query are slots not filled yet; the mask covers only the keys up to
        # it, and the attention function cuts K/V to that length, where the diagonal aligns.
        filled = q_off - kv_off + q_length
        if not aligned and not trim_future and pattern == "causal" and q_off >= kv_off \
                and filled < kv_length:
            pm = torch.ones(batch_size, filled, dtype=torch.bool, device=device) \
                if attention_mask is None else attention_mask.to(torch.bool)[:, kv_off:kv_off + filled]
            if pm.shape[-1] == filled:
                return pm
    if pattern is None or (pattern != "full" and not aligned and not trim_future):
        return _dense_mask(mu, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                           attention_mask, device)
    if attention_mask is None and not trim_future:
        return None
    if attention_mask is None:
        pm = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        pm = attention_mask.to(torch.bool)[:, kv_off:kv_off + kv_length]
        if pm.shape[-1] < kv_length:  # slots a static cache has not filled yet
            pm = F.pad(pm, (0, kv_length - pm.shape[-1]), value=False)
    if trim_future:
        pm = pm & (torch.arange(kv_length, device=pm.device) + kv_off <= q_off)
    if not torch.compiler.is_compiling() and bool(pm.all()):  # a host sync: not in a graph
        return None
    return pm
