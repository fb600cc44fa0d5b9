"""What HF + PEFT do today, as the baseline that benchmarks and the demo measure against.

`peft_path_attention` copies each row's prefix into the batch, concatenates it to the own
keys, builds the dense bool mask [B, 1, Sq, P + Skv] and calls
`F.scaled_dot_product_attention` the way transformers (5.24, 5.25) does in a model with PEFT's
prefix (`masking_utils` then `integrations.sdpa_attention.sdpa_attention_forward`):

- The mask is dropped when it says nothing SDPA cannot: no padding and either one query
  (decode: it sees every key) or as many queries as keys (then `is_causal=True`). With a
  prefix in training or prefill there are more keys than queries, so the mask stays.
- GQA without a mask: `enable_gqa=True` (the fused kernels read each kv head once).
- GQA with a mask and Sq > 1: `repeat_kv` copies every kv head over its query heads first;
  transformers does not pass `enable_gqa` with a mask because on CUDA no fused SDPA backend
  takes that pair and the call would fall back to the unfused math backend.
- GQA with a mask and Sq == 1: `pack_gqa` folds the query heads of one kv head into the query
  length ([B, Hkv, G, D]) so the mask broadcasts and nothing is repeated. transformers before
  `pack_gqa` existed (5.17, say) repeats K/V here too: the baseline follows the installed
  transformers on this point (the newest behaviour when transformers is not installed).

tests/test_baselines.py checks both decisions and the SDPA call against transformers' own
functions.

transformers builds the mask and makes the keep / drop decision once per forward, for all
layers (`masking_utils` in the model's forward); each layer then only concatenates its cache
and calls SDPA. `peft_path_forward` is that once-per-forward part and `peft_path_layer` the
per-layer part; a benchmark that times one layer calls the first outside the timed call.
`peft_path_attention` is both in one call (the numbers of one layer, with the per-forward work
counted as if every layer redid it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .reference import visible_mask
from .validation import normalize


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D], kv head h repeated for query heads
    h * groups ... h * groups + groups - 1 (a copy, as transformers makes it)."""
    if groups == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)


def transformers_mask(mask: torch.Tensor):
    """(attn_mask, is_causal) transformers hands SDPA for the dense visible mask [B, 1, Sq, L]:
    the mask itself, or None when it is all True (is_causal False) or, with Sq == L, exactly
    causal (is_causal True). Reads the mask on the host, as transformers' `fast_all` does."""
    Sq, L = mask.shape[-2], mask.shape[-1]
    if Sq != 1 and Sq != L:
        return mask, False
    if bool(mask.all()):
        return None, False
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    if Sq == L and torch.equal(mask, causal.expand_as(mask)):
        return None, True
    return mask, False


@functools.lru_cache(maxsize=None)
def transformers_packs_gqa() -> bool:
    """Whether the installed transformers folds GQA query heads for a masked one-token query."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return True
    return hasattr(sdpa_attention, "pack_gqa")


def sdpa_as_transformers(q, keys, vals, mask, scale):
    """SDPA as transformers calls it (see the module docstring). q [B, Hq, Sq, D],
    keys/vals [B, Hkv, L, D], mask: the dense visible mask [B, 1, Sq, L]."""
    mask, is_causal = transformers_mask(mask)
    return _sdpa_decided(q, keys, vals, mask, is_causal, scale)


def _sdpa_decided(q, keys, vals, mask, is_causal, scale):
    """transformers' `sdpa_attention_forward` given the mask it was handed (None: dropped)."""
    B, Hq, Sq, D = q.shape
    groups = Hq // keys.shape[1]
    if groups > 1 and mask is None and keys.shape[-1] == vals.shape[-1] <= 256:
        return F.scaled_dot_product_attention(q, keys, vals, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    if groups > 1 and Sq == 1 and transformers_packs_gqa():
        packed = q.reshape(B, Hq // groups, groups, D)
        out = F.scaled_dot_product_attention(packed, keys, vals, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, 1, out.shape[-1])
    keys, vals = repeat_kv(keys, groups), repeat_kv(vals, groups)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, is_causal=is_causal,
                                          scale=scale)


@dataclass(frozen=True)
class PeftPathForward:
    """What transformers works out once per forward, for every layer: the mask it hands SDPA
    (None when dropped) and is_causal; with the rows' bank ids, the scale, and whether some
    query may see no key (its NaN row is zeroed, as the contract says)."""

    prefix_ids: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    is_causal: bool
    scale: float
    zero_empty_rows: bool


def peft_path_forward(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                      prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                      window=None, softcap=None) -> PeftPathForward:
    """The once-per-forward part of the PEFT path (the dense mask built and read on the host);
    same arguments as `prefix_attention`. Hand the result to `peft_path_layer`."""
    if softcap is not None:
        raise ValueError("the SDPA baseline cannot express softcap")
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window)
    mask, is_causal = transformers_mask(visible_mask(a))
    return PeftPathForward(a.prefix_ids, mask, is_causal, a.scale, _may_have_empty_rows(a))


def peft_path_layer(q, k, v, prefix_k, prefix_v, fwd: PeftPathForward):
    """The per-layer part of the PEFT path: each row's prefix concatenated to its own K/V (the
    cache update's copy), then SDPA as transformers calls it with the forward's mask. q
    [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], prefix_k/v [N, Hkv, P, D] or [Hkv, P, D] (or None),
    all of the shapes `fwd` was made for; nothing is validated here."""
    if prefix_k is not None:
        if prefix_k.dim() == 3:
            prefix_k, prefix_v = prefix_k[None], prefix_v[None]
        k, v = _with_prefix(k, v, prefix_k, prefix_v, fwd.prefix_ids)
    out = _sdpa_decided(q, k, v, fwd.attn_mask, fwd.is_causal, fwd.scale)
    if fwd.zero_empty_rows:
        # SDPA gives NaN for rows with no visible key; the contract says zeros.
        out = torch.nan_to_num(out, nan=0.0)
    return out


def peft_path_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                        prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                        window=None, softcap=None):
    """Same arguments as `prefix_attention` (no softcap: SDPA cannot express it): the forward's
    part and one layer's in one call."""
    fwd = peft_path_forward(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids,
                            prefix_lens=prefix_lens, key_padding_mask=key_padding_mask,
                            causal=causal, scale=scale, window=window, softcap=softcap)
    return peft_path_layer(q, k, v, prefix_k, prefix_v, fwd)


def peft_path_attention_enable_gqa(q, k, v, prefix_k=None, prefix_v=None, *, mask=None,
                                   **kwargs):
    """The older form of the baseline (benchmarks up to 2026-11-28), kept to show in the same
    run what the change did: the same copies and mask, but GQA through `enable_gqa=True` with
    the mask, which transformers never passes (on CUDA that pair falls back to SDPA's unfused
    math backend). Same arguments as `peft_path_attention`; no empty-row handling. mask: the
    dense visible mask [B, 1, Sq, P + Skv] built once per forward (`older_baseline_mask`),
    else built here."""
    a = normalize(q, k, v, prefix_k, prefix_v, **kwargs)
    keys, vals, visible = _concatenated(a, with_mask=mask is None)
    return F.scaled_dot_product_attention(a.q, keys, vals,
                                          attn_mask=visible if mask is None else mask,
                                          scale=a.scale, enable_gqa=True)


def older_baseline_mask(q, k, v, prefix_k=None, prefix_v=None, **kwargs) -> torch.Tensor:
    """The dense visible mask the older baseline hands SDPA, built once per forward."""
    return visible_mask(normalize(q, k, v, prefix_k, prefix_v, **kwargs))


def _concatenated(a, with_mask=True):
    """PEFT's inputs to SDPA: keys and values [B, Hkv, P + Skv, D] with each row's prefix
    copied in front of its own (the per-row copy), and the dense mask [B, 1, Sq, P + Skv]
    (None without with_mask)."""
    keys, vals = _with_prefix(a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_ids)
    return keys, vals, visible_mask(a) if with_mask else None


def _with_prefix(k, v, prefix_k, prefix_v, ids):
    """Each row's prefix [N, Hkv, P, D] (by ``ids``) copied in front of its own K/V."""
    return (torch.cat([per_row_prefix(prefix_k, ids), k], dim=2),
            torch.cat([per_row_prefix(prefix_v, ids), v], dim=2))


def per_row_prefix(bank: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's prefix [B, Hkv, P, D]; a one-entry bank is expanded (a view), so that the
    torch.cat that follows makes the only copy, as PEFT's cache update does."""
    if bank.shape[0] == 1:
        return bank.expand(ids.shape[0], *bank.shape[1:])
    return bank[ids]


def _may_have_empty_rows(a) -> bool:
    """Whether some query may see no key. Without padding and with Skv >= Sq every query sees
    at least its own diagonal key (bottom-right causal alignment, window >= 1), so the
    baseline skips the extra pass over the output that HF would not make either."""
    return a.key_padding_mask is not None or a.q.shape[2] > a.k.shape[2]


def peft_path_prefix_bytes(num_layers, batch, num_kv_heads, num_q_heads, prefix_len, head_dim,
                           elem_bytes, repeat_for_gqa=True):
    """Bytes of prefix K/V PEFT's path materialises for one forward of `batch` rows: one copy
    per row (and per query head when transformers' `repeat_kv` copies K/V for GQA, which it
    does for every prefill and training forward since PEFT's prefix brings a mask)."""
    heads = num_q_heads if repeat_for_gqa else num_kv_heads
    return num_layers * 2 * batch * heads * prefix_len * head_dim * elem_bytes
