"""What HF + PEFT do today, as the baseline that benchmarks and the demo measure against.

`peft_path_attention` copies each row's prefix into the batch (`prefix_k[prefix_ids]`),
concatenates it to the own keys, builds an explicit bool mask [B, 1, Sq, P + Skv] and calls
`F.scaled_dot_product_attention(..., enable_gqa=True)`: the masked SDPA path PEFT's prefix
tuning forces on transformers 5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import visible_mask
from .validation import normalize


def peft_path_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                        prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                        window=None, softcap=None):
    """Same arguments as `prefix_attention` (no softcap: SDPA cannot express it)."""
    if softcap is not None:
        raise ValueError("the SDPA baseline cannot express softcap")
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window)
    keys = torch.cat([a.prefix_k[a.prefix_ids], a.k], dim=2)       # the per-row copy
    vals = torch.cat([a.prefix_v[a.prefix_ids], a.v], dim=2)
    mask = visible_mask(a)                                          # dense [B, 1, Sq, P+Skv]
    out = F.scaled_dot_product_attention(a.q, keys, vals, attn_mask=mask, scale=a.scale,
                                         enable_gqa=True)
    # SDPA gives NaN for rows with no visible key; the contract says zeros.
    return torch.nan_to_num(out, nan=0.0)


def peft_path_prefix_bytes(num_layers, batch, num_kv_heads, num_q_heads, prefix_len, head_dim,
                           elem_bytes, repeat_for_gqa=True):
    """Bytes of prefix K/V PEFT's path materialises for one forward of `batch` rows: one copy
    per row (and per query head when SDPA's math path repeats K/V for GQA)."""
    heads = num_q_heads if repeat_for_gqa else num_kv_heads
    return num_layers * 2 * batch * heads * prefix_len * head_dim * elem_bytes
