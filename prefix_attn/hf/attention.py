"""The ``AttentionInterface`` entry of ``"prefix_attn"`` (:func:`attention_forward`): HF's
q/k/v and mask go to :func:`prefix_attn.prefix_attention` with the layer's prefix, or to the
packed-sequence path, or, for what the kernels do not cover, to :func:`eager_prefix_attention`
(a plain PyTorch composite over ``[prefix; own keys]``) after a one-time warning."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .. import api  # its prefix_attention read per call: tests (and users) may wrap it
from ..packed import packed_attention, packed_dense_mask
from .mask import packed_from_positions
from .names import PACKED_ATTR, PREFIXES_KWARG, SELECTION_KWARG

_warned: set = set()

def _warn_once(reason: str) -> None:
    if torch.compiler.is_compiling():  # a warning inside a graph would break fullgraph=True
        return
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"prefix_attn: {reason} is not supported by the fused kernel; "
                      "falling back to the eager PyTorch composite (slower, same result)",
                      stacklevel=3)


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
        P = prefix_k.shape[2]
        lens = (torch.full((prefix_k.shape[0],), P, device=dev) if prefix_lens is None
                else prefix_lens.to(dev))
        pre_vis = torch.arange(P, device=dev)[None, :] < lens[prefix_ids][:, None]  # [B, P]
        # positions beyond a length are never read: zeros (0 * NaN of garbage there is NaN)
        used = pre_vis[:, None, :, None]
        rk = torch.where(used, prefix_k[prefix_ids], 0)                    # [B, Hkv, P, D]
        rv = torch.where(used, prefix_v[prefix_ids], 0)
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
        # a query with no visible key outputs zeros; its softmax is never taken (a NaN hidden
        # in the forward came back from SoftmaxBackward, which anomaly mode refuses)
        seen = (s != float("-inf")).any(dim=-1, keepdim=True)
        p = torch.where(seen, torch.softmax(s.masked_fill(~seen, 0.0), dim=-1), 0.0)
    p = F.dropout(p, p=dropout, training=training)
    out = torch.matmul(p.to(value.dtype), vv)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


def _layer_prefix(sel, module, query):
    """``(prefix_k, prefix_v)`` of ``module``'s layer in ``sel``, in the query's dtype (the
    layers run in another dtype than the bank was attached with under FSDP's mixed precision,
    which casts the parameters for the forward: the prefix follows the query)."""
    pk, pv = sel.layer(module.layer_idx)
    if pk.dtype != query.dtype:
        pk, pv = pk.to(query.dtype), pv.to(query.dtype)
    return pk, pv


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
    wanted = kwargs.get("output_attentions")
    if wanted is None and "output_attentions" not in kwargs:
        wanted = _config_output_attentions(_plain_attr(module, "config", None))
    if wanted:
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


def _plain_attr(module, name: str, default):
    """``getattr(module, name, default)`` for a plain attribute (not a parameter, buffer or
    submodule), read from the instance's ``__dict__`` then its class: a missing name costs no
    AttributeError raised and caught in ``nn.Module.__getattr__`` (microseconds per layer)."""
    d = module.__dict__
    return d[name] if name in d else getattr(type(module), name, default)


def _config_output_attentions(config) -> bool:
    """``config.output_attentions`` (False without a config), read past the config's Python
    ``__getattribute__`` chain where the value lies in its ``__dict__`` (transformers 5 keeps
    it as ``_output_attentions`` behind a property, older versions as ``output_attentions``)."""
    if config is None:
        return False
    if torch.compiler.is_compiling():  # dynamo cannot trace object.__getattribute__
        return getattr(config, "output_attentions", False)
    d = object.__getattribute__(config, "__dict__")
    for key in ("_output_attentions", "output_attentions"):
        if key in d:
            return d[key]
    return getattr(config, "output_attentions", False)


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
    return bool(_plain_attr(module, "is_cross_attention", False)) or \
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
            "prefix_attn.prefix_tuning(model, ...). A model without a bank has no prefix to "
            "apply: one loaded again from the checkpoint by a trainer (TRL's reference model "
            "with ref_model=None, for one) gets none of the prefixes; give it no prefixes= "
            "(or pass ref_model=copy.deepcopy(model), whose bank comes with it)")
    sel = kwargs.get(SELECTION_KWARG)
    if _is_cross_attention(module):
        sel = None  # prefixes belong to self-attention only
    elif sel is not None and _plain_attr(module, "layer_idx", None) is None:
        # not a layer of the language model (a vision tower's attention): no prefix here
        sel._skipped_modules = getattr(sel, "_skipped_modules", set()) | {type(module).__name__}
        sel = None
    causal = is_causal if is_causal is not None else _plain_attr(module, "is_causal", True)
    pk = pv = ids = lens = None
    if sel is not None:
        if not torch.compiler.is_compiling():
            # checked by the post-hook; inside a compiled checkpointed layer this side effect
            # made dynamo give up and run the whole layer eagerly
            sel._read_by_attention = True
        pk, pv = _layer_prefix(sel, module, query)
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
        # a packed row under one prefix (hooks._packed_row) falls back as a row: its prefix
        # for every query, its sequences apart by the packed mask
        ids = getattr(sel, "packed_row_ids", None)
        if ids is None:
            raise NotImplementedError(f"one prefix per packed sequence runs on the fused path only, "
                                      f"which does not support {reason}")
    if reason is not None:
        _warn_once(reason)
        if seq_ids is not None:
            dense = packed_dense_mask(seq_ids, causal, window)
        unpadded = getattr(sel, "_unpadded", None)  # hooks._pad_short: the fallback's
        if unpadded is not None:                     # probabilities show the real columns only
            pk, pv = _layer_prefix(unpadded, module, query) if unpadded.max_len else (None, None)
            if pk is None:
                ids = lens = None
        out, probs = eager_prefix_attention(query, key, value, pk, pv, ids, lens, kpm, dense, causal,
                                            scaling, window, softcap, dropout, module.training,
                                            sinks=_sinks(kwargs))
        return _plus_anchor(out, sel), probs
    if seq_ids is not None:
        out = packed_attention(query, key, value, seq_ids, pk, pv, prefix_ids=ids,
                               prefix_lens=lens, per_sequence=per_sequence is not None,
                               segs=getattr(sel, "packed_segments", None),
                               causal=causal, scale=scaling, window=window, softcap=softcap)
        return _plus_anchor(out, sel), None  # [B, S, Hq, D], contiguous (a boolean-index gather)
    out = api.prefix_attention(query, key, value, pk, pv, prefix_ids=ids, prefix_lens=lens,
                               key_padding_mask=kpm, causal=causal, scale=scaling, window=window,
                               softcap=softcap)
    return _plus_anchor(out.transpose(1, 2).contiguous(), sel), None


def _plus_anchor(out, sel):
    """``out`` plus the bank's zero anchor when ``sel`` carries one (a training batch without a
    trainable entry: the loss keeps a graph; bank._anchored)."""
    anchor = getattr(sel, "_anchor", None) if sel is not None else None
    return out if anchor is None else out + anchor.to(out.dtype)
