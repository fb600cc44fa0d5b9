"""Hugging Face transformers integration: attention function, mask function, ``prefixes=`` hook.

``register()`` (called by ``import prefix_attn``) adds, under the name ``"prefix_attn"``:

- ``attention_forward`` to ``AttentionInterface``: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, Skv, D]``
  (HF's layout) go to :func:`prefix_attn.prefix_attention` with the row's prefixes, the
  key padding mask, ``causal`` (``module.is_causal``), ``window`` (``sliding_window``),
  ``scale`` (``scaling``) and ``softcap``; returns ``([B, S, Hq, D], None)`` as HF expects.
- ``padding_mask`` to ``AttentionMaskInterface``: for the causal, sliding-window causal and
  bidirectional patterns it returns only the 2-D padding mask ``[B, kv_length]`` (or None
  when nothing is padded), never a dense 4-D mask. Packed sequences get their sequence ids
  (an int64 ``[B, kv]`` tensor, marked), which the attention function regroups one sequence
  per kernel row (``prefix_attn/packed.py``); inside torch.compile, where regrouping needs host
  syncs, they take the eager fallback with a dense mask built from them, unless the pre-hook
  already found the sequences and their regrouping (``prefixes=``: one graph). A static cache's prefill gets the padding mask of
  its filled slots only, and the attention function cuts K/V to that length. Anything else
  (custom mask overlays) gets a dense bool mask ``[B, 1, q, kv]``, which the attention
  function sends to the eager fallback below.
- ``"prefixes"`` as an optional key of ``TransformersKwargs``, so that ``generate`` accepts
  ``prefixes=`` and forwards it to every forward call.

How ``prefixes=`` reaches the attention: ``install_hooks(model)`` (called by
``PrefixBank.attach``) registers a forward pre-hook (with kwargs) on the model. It pops
``prefixes``, builds a :class:`~prefix_attn.bank.PrefixSelection` with ``model.prefix_bank``,
shifts ``position_ids`` by each row's prefix length (PEFT numbers the tokens after a prefix of
length P from P) and passes the selection down as the keyword ``prefix_selection``.
``prefixes`` is a list of names / bank ids / None ("" = None) per row, a LongTensor of bank ids,
or one name for every row. ``register()`` wraps ``GenerationMixin.generate`` (a no-op without
``prefixes=`` and a bank): it turns the list into an id tensor, which generate expands with the
rows for ``num_return_sequences`` and beams, and pins the bank for the call
(``PrefixBank.pinned``: other tenants' changes do not reach a running request). Every
supported family forwards ``**kwargs`` from the model's forward to the attention function,
and keywords survive gradient checkpointing (HF checkpoints ``partial(forward, **kwargs)``),
which a context variable would not (the backward replay runs outside the forward's context).
A post-hook checks that the attention function read the selection; a model that drops the
keyword raises instead of silently ignoring the prefixes (on eager forwards: inside a compiled
graph the attention function cannot record the read).

Cases the kernels do not cover (a dense mask, attention dropout in training,
``output_attentions``, attention sinks, value head dims unlike the key's) run
:func:`eager_prefix_attention`, a plain PyTorch composite over ``[prefix; own keys]``, after a
one-time warning. What neither path can do raises: position biases (T5), and
:func:`unsupported_model` (encoder-decoders, multi-head latent attention, models computing
attention in their own code) is checked when a bank is attached.
"""
from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from . import distributed
from .packed import packed_attention, packed_dense_mask, sequence_ids
from .packed import segments as packed_segments

ATTN_NAME = "prefix_attn"
SELECTION_KWARG = "prefix_selection"
PREFIXES_KWARG = "prefixes"
# Marks the sequence-id tensor that padding_mask returns for packed sequences.
PACKED_ATTR = "_prefix_attn_packed_sequence_ids"

# Models whose forward numbers the tokens from the attention mask when no position_ids are
# given (OPT: cumsum of the mask, pads skipped) rather than from the cache position as the
# others do; with PEFT's P ones in front of that mask, their real tokens count from P.
_MASK_NUMBERED = frozenset({"opt"})

_warned: set = set()

def _warn_once(reason: str) -> None:
    if torch.compiler.is_compiling():  # a warning inside a graph would break fullgraph=True
        return
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"prefix_attn: {reason} is not supported by the fused kernel; "
                      "falling back to the eager PyTorch composite (slower, same result)",
                      stacklevel=3)


# --------------------------------------------------------------------------------------
# mask function
# --------------------------------------------------------------------------------------
def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return None
    for var, cell in zip(code.co_freevars, fn.__closure__):
        if var == name:
            return cell.cell_contents
    return None


def mask_pattern(mask_function) -> Optional[str]:
    """"causal" | "sliding" | "full" for the mask functions the kernel expresses, else None.

    Matches transformers' ``causal_mask_function``, ``bidirectional_mask_function`` and
    ``sliding_window_causal_mask_function(w)`` (= ``and_masks(sliding_window_overlay(w), causal)``).
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "full"
    parts = _closure_value(mask_function, "mask_functions")
    if (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function
            and getattr(parts[0], "__qualname__", "").startswith("sliding_window_overlay.")):
        return "sliding"
    return None


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
    if not (isinstance(parts, tuple) and len(parts) == 2):
        return None
    base, last = parts
    if not getattr(last, "__qualname__", "").startswith("packed_sequence_mask_function."):
        return None
    ids = _closure_value(last, "packed_sequence_mask")
    if getattr(base, "__qualname__", "").startswith("remap_positions_for_packed_sequence."):
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
    transformers' flash-attention path (one row, more than one position, a decrease), for
    forwards where transformers' mask ignores the packing (a cache exists, as in a training
    forward with ``use_cache`` left on). One host read per forward; none while compiling."""
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
    if bool((torch.diff(position_ids, dim=-1) < 0).any()):
        ids = sequence_ids(position_ids)
    if len(_PACKED_BY_POSITIONS) >= 64:
        _PACKED_BY_POSITIONS.clear()
    _PACKED_BY_POSITIONS[id(position_ids)] = (weakref.ref(position_ids), stamp, ids)
    return ids


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

    if q_length is None:
        if cache_position is None:
            raise TypeError("padding_mask needs q_length or cache_position")
        q_length, q_offset, device = cache_position.shape[0], cache_position[0], cache_position.device
    if mask_function is None:
        mask_function = mu.causal_mask_function
    seq_ids = packed_sequence_ids(mask_function, q_length, kv_length, q_offset, kv_offset)
    if seq_ids is not None:
        return seq_ids
    pattern = mask_pattern(mask_function)
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


# --------------------------------------------------------------------------------------
# attention functions
# --------------------------------------------------------------------------------------
def eager_prefix_attention(query, key, value, prefix_k=None, prefix_v=None, prefix_ids=None,
                           prefix_lens=None, key_padding_mask=None, dense_mask=None,
                           causal=True, scale=None, window=None, softcap=None, dropout=0.0,
                           training=False, sinks=None):
    """Materialised attention over ``[prefix; own keys]`` (the fallback path).

    query ``[B, Hq, Sq, D]``; key/value ``[B, Hkv, Skv, D]``; prefix_k/v ``[N, Hkv, P, D]``;
    prefix_ids ``[B]``; prefix_lens ``[N]``; key_padding_mask bool ``[B, Skv]``;
    dense_mask ``[B, 1, Sq, Skv]`` bool (True = visible) or additive float, replacing
    causal/window/padding for the own keys. ``sinks`` ``[Hq]``: attention-sink logits (gpt-oss),
    one extra softmax column per head that takes probability mass and gives no value. Returns
    (out ``[B, Sq, Hq, D]``, probabilities ``[B, Hq, Sq, P + Skv]``), the layout of HF's
    attention functions.
    """
    B, Hq, Sq, D = query.shape
    Hkv, Skv = key.shape[1], key.shape[2]
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    dev = query.device
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        if prefix_ids is None:
            prefix_ids = torch.zeros(B, dtype=torch.long, device=dev)
        rk, rv = prefix_k[prefix_ids], prefix_v[prefix_ids]                # [B, Hkv, P, D]
        P = rk.shape[2]
        lens = (torch.full((prefix_k.shape[0],), P, device=dev) if prefix_lens is None
                else prefix_lens.to(dev))
        pre_vis = torch.arange(P, device=dev)[None, :] < lens[prefix_ids][:, None]  # [B, P]
    else:
        P = 0
        rk = key.new_zeros(B, Hkv, 0, D)
        rv = value.new_zeros(B, Hkv, 0, value.shape[-1])
        pre_vis = torch.ones(B, 0, dtype=torch.bool, device=dev)
    rep = Hq // Hkv
    kk = torch.cat([rk.to(key.dtype), key], dim=2).repeat_interleave(rep, dim=1)
    vv = torch.cat([rv.to(value.dtype), value], dim=2).repeat_interleave(rep, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(query.to(ct), kk.to(ct).transpose(-1, -2)) * scale   # [B, Hq, Sq, P + Skv]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    own_add = None
    if dense_mask is not None:
        if dense_mask.dtype == torch.bool:
            own_vis = dense_mask.expand(B, 1, Sq, Skv)
        else:  # an additive mask (0 / large negative), as HF's eager masks
            own_vis = torch.ones(B, 1, Sq, Skv, dtype=torch.bool, device=dev)
            own_add = dense_mask.to(ct).expand(B, 1, Sq, Skv)
    else:
        i = torch.arange(Sq, device=dev)[:, None]
        j = torch.arange(Skv, device=dev)[None, :]
        diag = Skv - Sq + i
        own_vis = torch.ones(Sq, Skv, dtype=torch.bool, device=dev)
        if causal:
            own_vis = own_vis & (j <= diag)
        if window is not None and window > 0:
            own_vis = own_vis & (diag - j < window)
        own_vis = own_vis[None, None].expand(B, 1, Sq, Skv)
        if key_padding_mask is not None:
            own_vis = own_vis & key_padding_mask[:, None, None, :].to(torch.bool)
    vis = torch.cat([pre_vis[:, None, None, :].expand(B, 1, Sq, P), own_vis], dim=-1)
    if own_add is not None:
        s = torch.cat([s[..., :P], s[..., P:] + own_add], dim=-1)
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        sink = sinks.to(device=dev, dtype=ct).reshape(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)    # a query with no visible key outputs zeros
    p = F.dropout(p, p=dropout, training=training)
    out = torch.matmul(p.to(value.dtype), vv)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


def _own_key_mask(module, query, Skv, attention_mask, per_sequence, kwargs):
    """How the own keys are masked, from what :func:`padding_mask` returned (see
    docs/INTERNALS.md): (key padding mask, dense mask, packed sequence ids, fallback reason)."""
    if per_sequence is not None:  # one prefix per packed sequence (the pre-hook found them)
        if query.shape[2] != Skv:
            raise ValueError("one prefix per packed sequence needs the whole packed rows in one "
                             "forward (no KV cache from an earlier call)")
        return None, None, per_sequence, None
    if attention_mask is None:
        if query.shape[2] != Skv or _is_cross_attention(module):
            return None, None, None, None
        seq_ids = packed_from_positions(kwargs.get("position_ids"), query.shape[0], Skv)
        return None, None, seq_ids, None
    if getattr(attention_mask, PACKED_ATTR, False):
        if torch.compiler.is_compiling():  # regrouping needs host syncs: not in a graph
            return None, None, attention_mask, "packed sequences inside torch.compile"
        return None, None, attention_mask, None
    if attention_mask.dim() == 2:
        return attention_mask.to(torch.bool)[:, -Skv:], None, None, None
    return None, attention_mask[..., -Skv:], None, "a dense (4-D) attention mask"


def _fallback_reason(module, query, value, dropout, kwargs) -> Optional[str]:
    """What the fused kernel cannot do in this call (None: nothing)."""
    reason = None
    if dropout and dropout > 0.0 and module.training:
        reason = "attention dropout in training"
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        reason = "output_attentions"
    if value.shape[-1] != query.shape[-1]:
        reason = "a value head dim different from the key head dim (multi-head latent attention)"
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} adds a position bias to its attention scores (T5-style "
            f"relative attention), which prefix_attn does not apply: use attn_implementation="
            f"'eager' or 'sdpa' for this model")
    if _sinks(kwargs) is not None:
        reason = "attention sinks"
    return reason


def _sinks(kwargs):
    """Attention-sink logits ``[Hq]`` passed to the attention function (gpt-oss: ``s_aux``)."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _is_cross_attention(module) -> bool:
    """Whether ``module`` attends to encoder states: GPT-2's attention says so in an attribute;
    BERT-style decoders (BERT, RoBERTa, ... with add_cross_attention) set it only on the
    wrapper, and the module the attention function receives is their ``*CrossAttention``."""
    return bool(getattr(module, "is_cross_attention", False)) or \
        type(module).__name__.endswith("CrossAttention")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The ``AttentionInterface`` entry of ``"prefix_attn"``.

    query ``[B, Hq, S, D]``, key/value ``[B, Hkv, Skv, D]`` (views, as HF passes them);
    attention_mask: what :func:`padding_mask` returned (None, ``[B, Skv]``, marked packed
    sequence ids ``[B, S]`` or dense 4-D: docs/INTERNALS.md).
    ``kwargs[prefix_selection]``: the batch's PrefixSelection (set by the pre-hook) or absent.
    Returns ``(out [B, S, Hq, D], None)`` (or the probabilities on the fallback path).
    """
    if kwargs.get(PREFIXES_KWARG) is not None:
        raise ValueError(
            "prefixes= reached the attention function without passing through prefix_attn's "
            "hook: call the model the prefix bank is attached to (model(...) or model.generate(...), "
            "not a submodule such as model.model), after PrefixBank.attach(model) or "
            "prefix_attn.prefix_tuning(model, ...)")
    sel = kwargs.get(SELECTION_KWARG)
    if _is_cross_attention(module):
        sel = None  # prefixes belong to self-attention only
    elif sel is not None and getattr(module, "layer_idx", None) is None:
        # not a layer of the language model (a vision tower's attention): no prefix here
        sel._skipped_modules = getattr(sel, "_skipped_modules", set()) | {type(module).__name__}
        sel = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    pk = pv = ids = lens = None
    if sel is not None:
        if not torch.compiler.is_compiling():
            # checked by the post-hook; inside a compiled checkpointed layer this side effect
            # made dynamo give up and run the whole layer eagerly
            sel._read_by_attention = True
        pk, pv = sel.layer(module.layer_idx)
        if pk.dtype != query.dtype:
            # the layers run in another dtype than the bank was attached with (FSDP's mixed
            # precision casts the parameters for the forward): the prefix follows the query
            pk, pv = pk.to(query.dtype), pv.to(query.dtype)
        ids, lens = sel.prefix_ids, sel.prefix_lens
    per_sequence = getattr(sel, "packed_seq_ids", None) if sel is not None else None
    if attention_mask is not None and attention_mask.dim() == 2 and \
            not getattr(attention_mask, PACKED_ATTR, False) and attention_mask.shape[-1] < key.shape[2]:
        # padding_mask covered only the filled slots of a static cache (prefill): cut K/V there
        n = attention_mask.shape[-1]
        key, value = key[:, :, :n], value[:, :, :n]
    kpm, dense, seq_ids, reason = _own_key_mask(module, query, key.shape[2], attention_mask,
                                                per_sequence, kwargs)
    reason = _fallback_reason(module, query, value, dropout, kwargs) or reason
    window = int(sliding_window) if sliding_window else None
    softcap = float(softcap) if softcap else None
    if reason is not None and per_sequence is not None:
        raise NotImplementedError(f"one prefix per packed sequence runs on the fused path only, "
                                  f"which does not support {reason}")
    if reason is not None:
        _warn_once(reason)
        if seq_ids is not None:
            dense = packed_dense_mask(seq_ids, causal, window)
        return eager_prefix_attention(query, key, value, pk, pv, ids, lens, kpm, dense, causal,
                                      scaling, window, softcap, dropout, module.training,
                                      sinks=_sinks(kwargs))
    from .api import prefix_attention

    if seq_ids is not None:
        out = packed_attention(query, key, value, seq_ids, pk, pv, prefix_ids=ids,
                               prefix_lens=lens, per_sequence=per_sequence is not None,
                               segs=getattr(sel, "packed_segments", None),
                               causal=causal, scale=scaling, window=window, softcap=softcap)
        return out, None  # [B, S, Hq, D], contiguous (a boolean-index gather)
    out = prefix_attention(query, key, value, pk, pv, prefix_ids=ids, prefix_lens=lens,
                           key_padding_mask=kpm, causal=causal, scale=scaling, window=window,
                           softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------
# prefixes= : hooks on the model
# --------------------------------------------------------------------------------------
# forward function -> its parameter names (inspect.signature costs ~0.1 ms: once per function,
# not once per decode step); weakly keyed, so a per-instance wrapper does not pin its model
_FORWARD_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward_params(model) -> list:
    forward = model.forward
    func = getattr(forward, "__func__", forward)
    try:
        names = _FORWARD_PARAMS.get(func)
    except TypeError:  # not weak-referenceable: no cache
        return list(inspect.signature(forward).parameters)
    if names is None:
        names = _FORWARD_PARAMS[func] = list(inspect.signature(forward).parameters)
    return names


def cache_kwarg(model) -> str:
    """Name of the KV-cache keyword of ``model.forward``: ``"cache"`` (transformers >= 5.2x)
    or ``"past_key_values"`` (earlier 5.x). An unknown keyword would be swallowed by
    ``**kwargs`` and the cache silently ignored, so callers pass ``{cache_kwarg(m): cache}``."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _batch_and_length(kwargs):
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if t is not None:
            return t.shape[0], t.shape[1], t.device
    raise ValueError("prefixes= needs input_ids or inputs_embeds")


def _from_numpy(prefixes):
    """A numpy array of ids (or names) as a list (a 0-d one as its value); anything else as is."""
    if type(prefixes).__module__ == "numpy" and hasattr(prefixes, "tolist"):
        return prefixes.tolist()
    return prefixes


def _rows_for(prefixes):
    """Normalise ``prefixes`` for ``bank.select``: "" -> None (a name per row, or one name)."""
    if isinstance(prefixes, (list, tuple)):
        return [None if isinstance(p, str) and p == "" else p for p in prefixes]
    if isinstance(prefixes, str) and prefixes == "":
        return None
    return prefixes


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
    config = getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        return
    names = bank.names()
    lens = [bank.entry_len(names[i]) if 0 <= i < len(names) else 0 for i in ids.tolist()]
    mask = kwargs.get("attention_mask")
    real = mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
        else [tokens.shape[1]] * len(lens)
    # positions used: the prefix, the prompt's real tokens and every new token but the last
    # (which is never fed back)
    top = max(P + int(n) for P, n in zip(lens, real)) + int(new) - 1
    if top > limit:
        raise ValueError(f"generate would reach position {top - 1} (a prefix, the prompt's tokens "
                         f"and max_new_tokens={new}), {_past_the_table(model, limit)}: shorten "
                         "the prompt, the prefix or max_new_tokens")


def _generate_batch_size(args, kwargs) -> Optional[int]:
    for t in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"),
              kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[0]
    return None


def _wrap_generate(generate):
    """``GenerationMixin.generate`` for models with a prefix bank and ``prefixes=``: the names
    become an id tensor ``[B]`` before generate starts (generate then expands it with the rows,
    for beams and ``num_return_sequences``, as it does every tensor keyword; a list it would
    pass on unexpanded), and the bank is pinned for the whole call (a request keeps its
    prefixes while other tenants change the bank). ``prefixes=`` on a model without any bank
    raises (transformers would pass it on to attention functions that ignore it). Anything
    else: generate unchanged."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        prefixes = kwargs.get(PREFIXES_KWARG)
        if prefixes is None:
            return generate(self, *args, **kwargs)
        prefixes = kwargs[PREFIXES_KWARG] = _from_numpy(prefixes)
        bank = self.__dict__.get("_modules", {}).get("prefix_bank")
        if bank is None:
            from .bank import _PINNED, PrefixBank

            inner = next((m for m in self.modules() if isinstance(m, PrefixBank)), None)
            if inner is None and _PINNED.get():
                # the assistant model of assisted generation, called inside the generate of a
                # model with a bank: it drafts without the prefixes, the main model verifies
                # every drafted token with them (the output stays exact)
                kwargs.pop(PREFIXES_KWARG)
                return generate(self, *args, **kwargs)
            if inner is None:
                raise ValueError(
                    f"generate(prefixes=...) on a {type(self).__name__} without a prefix bank: the "
                    "prefixes would be ignored; attach one first (prefix_attn.PrefixBank.attach(model) "
                    "or prefix_attn.prefix_tuning(model, ...))")
            with inner.pinned():  # a bank on a submodule (the language model of a VLM): its
                return generate(self, *args, **kwargs)  # own hook reads the names
        if isinstance(prefixes, torch.Tensor):
            prefixes = _ids_of_an_outer_bank(bank, prefixes)
            if prefixes is None:  # names this bank lacks: it drafts without prefixes
                kwargs.pop(PREFIXES_KWARG)
                return generate(self, *args, **kwargs)
            kwargs[PREFIXES_KWARG] = prefixes
        with bank.pinned():
            B = _generate_batch_size(args, kwargs)
            if B is not None and not isinstance(prefixes, torch.Tensor):
                # on the host: each step reads the (expanded) ids back without a device sync
                kwargs[PREFIXES_KWARG] = bank.ids(_rows_for(prefixes), B, device="cpu")
            _check_generate_positions(self, bank, args, kwargs)
            return generate(self, *args, **kwargs)

    wrapper._prefix_attn_wrapped = True
    return wrapper


def _ids_of_an_outer_bank(bank, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """``ids`` for ``bank``: unchanged, unless this generate runs inside the generate of a model
    with another bank (this model is its assistant, drafting for assisted generation), whose
    wrapper turned the names into ids of *that* bank: then the same names in this bank (None
    when this bank lacks one of them: the assistant drafts without prefixes, and the main model
    verifies every token with them, so the output stays exact)."""
    from .bank import _PINNED

    outer = [state for b, state in (_PINNED.get() or {}).values() if b is not bank]
    if not outer:
        return ids
    names = list(outer[-1][1])  # the outer bank as its generate pinned it
    rows = [names[i] if 0 <= i < len(names) else None for i in ids.tolist()]
    if any(r is not None and r not in bank for r in rows):
        return None
    return bank.ids(rows, len(rows), device="cpu")


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
    over the mask, pads -1, as they count them behind PEFT's P ones). ``uniform``: every row
    has the same prefix length (known on the host)."""
    pos = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
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


def learned_position_limit(model) -> Optional[int]:
    """How many positions ``model``'s table of learned position embeddings holds (GPT-2's and
    GPT-BigCode's ``wpe``, OPT's and BioGPT's ``embed_positions`` less their offset, BERT's
    ``position_embeddings``), or None for models without one (rotary and the like, which run
    past their nominal length instead of failing). Cached on the model."""
    cached = model.__dict__.get("_prefix_attn_position_limit", False)
    if cached is not False:
        return cached
    limit = None
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe"):
            limit = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
            break
    model.__dict__["_prefix_attn_position_limit"] = limit
    return limit


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
    return (f"beyond the {limit} learned positions of {type(model).__name__} (tokens after a "
            "prefix are numbered from its length, as PEFT numbers them)")


def _cache_length(kwargs) -> int:
    """Positions already in the KV cache of this forward (0 without one)."""
    # transformers >= 5.2x calls it `cache`, earlier 5.x releases `past_key_values`
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def _mark_dynamic(sel) -> None:
    """Tell torch.compile that the number of stacked entries and the longest prefix vary from
    batch to batch (a serving mix would otherwise recompile at the first change of each and
    reach dynamo's recompile limit sooner). A no-op outside torch.compile."""
    for t, dim in ((sel._kv, 2), (sel._kv, 4), (sel.prefix_lens, 0)):
        if t.shape[dim] >= 2:  # sizes 0 and 1 are specialised whatever the mark
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _without_cache(model, kwargs) -> bool:
    """Whether this forward runs without a KV cache: none given, and ``use_cache`` (the
    keyword, else the config's) off or turned off by activation checkpointing in training."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    use = kwargs.get("use_cache")
    if use is None:
        use = getattr(getattr(model, "config", None), "use_cache", False)
    if not use:
        return True
    return model.training and torch.is_grad_enabled() and \
        any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _no_packing_search(model, kwargs, B: int, S: int, device) -> None:
    """For a batch whose sequences the hook knows (one a row, or found packed): an all-ones
    mask where there is neither a mask nor a cache, the case where transformers looks for
    packed sequences in the position ids; inside torch.compile it cannot rule them out and
    masks with a packed-sequence function that cannot be read without a graph break."""
    if kwargs.get("attention_mask") is None and _without_cache(model, kwargs):
        kwargs["attention_mask"] = torch.ones(B, S, dtype=torch.bool, device=device)


def _contiguous(position_ids) -> bool:
    """Whether every row of ``position_ids`` counts up by one (transformers' rule for one
    sequence a row). One host read, in place of the one transformers makes for packing."""
    return position_ids.dim() == 2 and bool((torch.diff(position_ids, dim=-1) == 1).all())


def _packed_row(prefixes, kwargs, B: int, S: int):
    """``(prefixes, seq_ids)``: for one row packing several sequences under one prefix (no
    mask, no cache content, ``position_ids`` that restart), the prefix repeated per sequence
    and the sequence ids, so the row takes the per-sequence path, found here, outside any
    compiled graph (the attention function cannot read the positions inside one); else
    ``(prefixes, None)``. One host read."""
    rows = prefixes if isinstance(prefixes, (list, tuple)) else [prefixes]
    if B != 1 or len(rows) != 1 or isinstance(rows[0], torch.Tensor) \
            or kwargs.get("attention_mask") is not None or _cache_length(kwargs):
        return prefixes, None
    seq_ids = packed_from_positions(kwargs.get("position_ids"), B, S)
    if seq_ids is None:
        return prefixes, None
    return list(rows) * (int(seq_ids[0, -1]) + 1), seq_ids


def _packed_request(prefixes, position_ids, attention_mask, B: int, S: int):
    """Sequence ids ``[B, S]`` (numbered across the batch, 0..n-1) when ``prefixes`` names one
    prefix per packed sequence: more entries than rows, and ``position_ids`` that restart
    exactly that often; else None. The ids come from the positions before they are shifted by
    the prefixes (a shifted boundary could look contiguous), and the attention function uses
    them instead of finding the sequences itself."""
    if isinstance(prefixes, (list, tuple)):
        count = len(prefixes)
    elif isinstance(prefixes, torch.Tensor) and prefixes.dim() == 1:
        count = prefixes.numel()
    else:
        return None
    if count <= B:
        return None
    wrong = (f"got {count} prefixes for a batch of {B} rows: give one per row, or one per "
             "sequence for rows that pack several sequences without padding (no attention_mask, "
             "position_ids restarting at each sequence, as DataCollatorWithFlattening makes them)")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != S:
        raise ValueError(f"{wrong}; no such position_ids were given")
    if attention_mask is not None and not (attention_mask.dim() == 2 and bool(attention_mask.all())):
        raise ValueError(f"{wrong}; this batch is padded (attention_mask has zeros)")
    local = sequence_ids(position_ids.expand(B, S))
    counts = local[:, -1] + 1  # sequences per row
    seq_ids = local + (counts.cumsum(0) - counts)[:, None]
    n = int(counts.sum())
    if n != count:
        raise ValueError(f"{wrong}; its position_ids restart into {n} sequences")
    return seq_ids


def _pre_hook(model, args, kwargs):
    # traceable when there is nothing to do: a compiled function that calls a model with a bank
    # but without prefixes= keeps one graph (fullgraph=True works)
    if PREFIXES_KWARG not in kwargs:
        return None
    return _prefixes_to_selection(model, args, kwargs)


@torch.compiler.disable
def _prefixes_to_selection(model, args, kwargs):
    """The pre-hook's work: ``prefixes=`` -> a :class:`PrefixSelection` in the kwargs, position
    ids shifted past the prefixes, packed sequences found (outside any graph)."""
    prefixes = _from_numpy(kwargs.pop(PREFIXES_KWARG))
    if args:  # bind positional arguments to their names so that position_ids can be set
        names = _forward_params(model)
        kwargs.update(dict(zip(names, args)))
        args = ()
    if prefixes is None:
        return args, kwargs
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != ATTN_NAME:
        raise ValueError(f"prefixes= needs attn_implementation={ATTN_NAME!r}; this model uses "
                         f"{impl!r} (call model.set_attn_implementation({ATTN_NAME!r}))")
    media = sorted(k for k, v in kwargs.items()
                   if v is not None and k.startswith(("pixel_values", "input_features")))
    if media:
        raise NotImplementedError(
            f"prefixes= with {', '.join(media)}: the positions of image, video and audio tokens "
            "(M-RoPE and the like) are not shifted past a prefix yet; text-only inputs work")
    bank = getattr(model, "prefix_bank", None)
    if bank is None:
        raise ValueError(f"prefixes= on a {type(model).__name__} whose prefix bank was removed: "
                         "attach one again (prefix_attn.PrefixBank.attach(model))")
    B, S, device = _batch_and_length(kwargs)
    given_positions = kwargs.get("position_ids")
    seq_ids = _packed_request(prefixes, given_positions, kwargs.get("attention_mask"), B, S)
    if seq_ids is None:
        prefixes, seq_ids = _packed_row(prefixes, kwargs, B, S)
    if seq_ids is not None:  # one prefix per packed sequence
        sel = bank.select(prefixes, len(prefixes), device=device)
        sel.packed_seq_ids = seq_ids.to(device)
        # the regrouping's index tensors, found here (host syncs) rather than in every layer,
        # where a compiled forward would break its graph for them
        sel.packed_segments = packed_segments(sel.packed_seq_ids)
        row_lens = sel.row_lens.to(device)
        kwargs["position_ids"] = kwargs["position_ids"].expand(B, S) + row_lens[sel.packed_seq_ids]
        _no_packing_search(model, kwargs, B, S, device)  # the sequences are known
    else:
        sel = bank.select(_rows_for(prefixes), B, device=device)
        row_lens = sel.row_lens.to(device)
        if "position_ids" in _forward_params(model) and any(sel.host_row_lens):
            pos = _positions_after_prefix(model, kwargs, S, row_lens, device,
                                          uniform=len(set(sel.host_row_lens)) == 1)
            if pos is not None:
                kwargs["position_ids"] = pos
                _check_positions(model, S, kwargs, max(sel.host_row_lens))
                if given_positions is None or _contiguous(given_positions):
                    _no_packing_search(model, kwargs, B, S, device)  # one sequence a row
    _mark_dynamic(sel)
    kwargs[SELECTION_KWARG] = sel
    if not _warned_reentrant and model.training and sel._kv.requires_grad:
        _check_reentrant_data_parallel(model)
    return args, kwargs


_warned_reentrant = False


def _check_reentrant_data_parallel(model) -> None:
    """Warn (once) when a trained prefix meets reentrant checkpointing in a multi-process run:
    every checkpointed layer runs its own backward into the prefix's parameters, and
    DistributedDataParallel without ``static_graph`` syncs only the first of those gradients."""
    global _warned_reentrant
    if torch.compiler.is_compiling() or distributed.world_size() == 1 \
            or not distributed.reentrant_checkpointing(model):
        return
    _warned_reentrant = True
    warnings.warn(
        "prefix_attn: a trained prefix with reentrant activation checkpointing "
        "(use_reentrant=True) in a multi-process run: every layer's backward adds to the "
        "prefix's gradient separately, and DistributedDataParallel without static_graph=True "
        "either fails in the backward ('Expected to mark a variable ready only once') or "
        "syncs only part of the gradient (wrong gradients, no error). Use use_reentrant=False "
        "(transformers' default) or DistributedDataParallel(..., static_graph=True)",
        stacklevel=3)


def _post_hook(model, args, kwargs, output):
    if SELECTION_KWARG not in kwargs:  # no prefixes= in this forward (traceable, as above)
        return None
    return _check_selection_read(model, kwargs[SELECTION_KWARG], output, _in_compiled_call())


def _in_compiled_call() -> bool:
    """Whether this hook runs inside a call to a torch.compile'd module or function (whose
    graphs do not mark the selection read); True where torch cannot tell."""
    if torch.compiler.is_compiling():  # traced inline: dynamo must not reach the call below
        return True
    callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    callback = getattr(callback, "get_eval_frame_callback", None)
    return callback is None or callback() is not None


def _has_compiled_forward(model) -> bool:
    """Whether ``model`` or a submodule runs a compiled forward of its own
    (``m.forward = torch.compile(m.forward)``, ``m.compile()``)."""
    return any(getattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable", None) is not None
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


@torch.compiler.disable
def _check_selection_read(model, sel, output, in_compiled_call: bool):
    """The forward's own selection (from its kwargs: nothing kept between the hooks, so a
    forward interrupted by a BaseException leaves nothing behind) was read by its attention;
    a compiled forward is not judged (inside a graph the attention function cannot mark it)."""
    used = getattr(sel, "_read_by_attention", False)
    if not used and output is not None and any(sel.host_row_lens) and not in_compiled_call \
            and not _has_compiled_forward(model):
        skipped = sorted(getattr(sel, "_skipped_modules", ()))
        why = (f"its attention modules ({', '.join(skipped)}) have no layer index"
               if skipped else "its forward does not forward **kwargs to attention?")
        raise RuntimeError(
            f"{type(model).__name__} did not pass the prefix selection down to its attention "
            f"function ({why}); the prefixes were not applied")
    return None


@functools.lru_cache(maxsize=None)
def uses_attention_interface(cls) -> bool:
    """Whether the transformers modeling module of ``cls`` (the first class of its MRO defined
    under ``transformers.models``) dispatches attention through ``ALL_ATTENTION_FUNCTIONS``;
    True for classes outside transformers (nothing to judge from)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("transformers.models."):
            try:
                return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(inspect.getmodule(klass))
            except (OSError, TypeError):
                return True
    return True


def unsupported_model(model) -> Optional[str]:
    """Why prefixes cannot be served on ``model`` (None: they can): an encoder-decoder, keys and
    values of different head dims (multi-head latent attention), or attention computed in
    the model's own code instead of through transformers' attention interface."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    name = type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model: PEFT puts a prefix on its decoder's self- "
                "and cross-attention, which prefix_attn does not do (decoder-only and encoder "
                "models only); use PEFT for it")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "kv_lora_rank", None) or getattr(text, "qk_rope_head_dim", None):
        return (f"{name} uses multi-head latent attention (keys and values of different head "
                "dims), which the prefix bank and kernels do not support")
    if not uses_attention_interface(type(model)):
        return (f"{name} computes attention in its own code, not through transformers' "
                "AttentionInterface, so no attention implementation (prefix_attn included) can "
                "be plugged into it")
    return None


def model_caveat(model) -> Optional[str]:
    """Where prefixes on ``model`` work but differ from PEFT (a warning at attach), or None."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk:
        return (f"{type(model).__name__} uses chunked attention ({chunk} tokens): a prefix stays "
                "visible to every token, where PEFT's prefix (the first positions of the cache) "
                "is hidden from tokens past the first chunk")
    return None


# torch.compile(model) runs the hooks outside its graph: they are never compiled as frames of
# their own (tracing _pre_hook there would break the graph at its disabled body); a compiled
# function that calls the model inlines them, and without prefixes= they add nothing
_skip_code = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
for _hook in (_pre_hook, _post_hook) if _skip_code is not None else ():
    _skip_code(_hook.__code__)


def install_hooks(model) -> None:
    """Register the ``prefixes=`` pre-hook and its check on ``model`` (idempotent)."""
    if getattr(model, "_prefix_attn_hooks", None) is not None:
        return
    h1 = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    h2 = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model._prefix_attn_hooks = (h1, h2)


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------
_registered = False


def register() -> bool:
    """Register ``"prefix_attn"`` with transformers (idempotent). False if transformers is missing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask)
    try:  # generate() validates model kwargs against TransformersKwargs' keys
        from transformers.utils.generic import TransformersKwargs

        keys = getattr(TransformersKwargs, "__optional_keys__", None)
        if keys is not None and PREFIXES_KWARG not in keys:
            TransformersKwargs.__optional_keys__ = frozenset(keys | {PREFIXES_KWARG, SELECTION_KWARG})
    except ImportError:
        pass
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        GenerationMixin = None
    if GenerationMixin is not None and not getattr(GenerationMixin.generate, "_prefix_attn_wrapped", False):
        GenerationMixin.generate = _wrap_generate(GenerationMixin.generate)
    _registered = True
    return True


register()
