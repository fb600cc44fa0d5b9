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
"""
from __future__ import annotations

import functools

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
    B, Hq, Sq, D = q.shape
    groups = Hq // keys.shape[1]
    mask, is_causal = transformers_mask(mask)
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


def peft_path_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                        prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                        window=None, softcap=None):
    """Same arguments as `prefix_attention` (no softcap: SDPA cannot express it)."""
    if softcap is not None:
        raise ValueError("the SDPA baseline cannot express softcap")
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window)
    out = sdpa_as_transformers(a.q, *_concatenated(a), a.scale)
    if _may_have_empty_rows(a):
        # SDPA gives NaN for rows with no visible key; the contract says zeros.
        out = torch.nan_to_num(out, nan=0.0)
    return out


def peft_path_attention_enable_gqa(q, k, v, prefix_k=None, prefix_v=None, **kwargs):
    """The older form of the baseline (benchmarks up to 2026-11-28), kept to show in the same
    run what the change did: the same copies and mask, but GQA through `enable_gqa=True` with
    the mask, which transformers never passes (on CUDA that pair falls back to SDPA's unfused
    math backend). Same arguments as `peft_path_attention`; no empty-row handling."""
    a = normalize(q, k, v, prefix_k, prefix_v, **kwargs)
    keys, vals, mask = _concatenated(a)
    return F.scaled_dot_product_attention(a.q, keys, vals, attn_mask=mask, scale=a.scale,
                                          enable_gqa=True)


def _concatenated(a):
    """PEFT's inputs to SDPA: keys and values [B, Hkv, P + Skv, D] with each row's prefix
    copied in front of its own (the per-row copy), and the dense mask [B, 1, Sq, P + Skv]."""
    keys = torch.cat([per_row_prefix(a.prefix_k, a.prefix_ids), a.k], dim=2)
    vals = torch.cat([per_row_prefix(a.prefix_v, a.prefix_ids), a.v], dim=2)
    return keys, vals, visible_mask(a)


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
