"""The ground truth: `prefix_attention_ref`, a plain PyTorch implementation of docs/DESIGN.md §2.

It materialises the full score matrix (prefix gathered per row, then own keys), so it is
simple rather than fast. Every test and benchmark compares against it.
"""
from __future__ import annotations

import torch

from .validation import AttnArgs, normalize


def visible_mask(a: AttnArgs) -> torch.Tensor:
    """Bool [B, 1, Sq, P + Skv]: which keys each query sees (prefix first, then own keys)."""
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    dev = a.q.device
    row_lens = a.prefix_lens[a.prefix_ids]                                  # [B]
    pre = torch.arange(P, device=dev)[None, :] < row_lens[:, None]          # [B, P]
    pre = pre[:, None, :].expand(B, Sq, P)
    i = torch.arange(Sq, device=dev)[:, None]
    j = torch.arange(Skv, device=dev)[None, :]
    diag = Skv - Sq + i                                                      # bottom-right aligned
    own = torch.ones(Sq, Skv, dtype=torch.bool, device=dev)
    if a.causal:
        own = own & (j <= diag)
    if a.window > 0:
        own = own & (diag - j < a.window)
    own = own[None].expand(B, Sq, Skv)
    if a.key_padding_mask is not None:
        own = own & a.key_padding_mask[:, None, :]
    return torch.cat([pre, own], dim=-1)[:, None]


def attention_from_args(a: AttnArgs, upcast: bool = True):
    """(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] float32) for normalised args."""
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    if a.q.dtype == torch.float64:
        ct = torch.float64
    else:
        ct = torch.float32 if upcast else a.q.dtype
    G = Hq // Hkv
    # positions beyond an entry's length are never read (zeros, not only masked scores: garbage
    # there, a NaN say, would reach the output through 0 * NaN)
    used = (torch.arange(P, device=a.q.device) < a.prefix_lens[a.prefix_ids][:, None])[:, None, :, None]
    pk = torch.where(used, a.prefix_k[a.prefix_ids], 0)                      # [B, Hkv, P, D]
    pv = torch.where(used, a.prefix_v[a.prefix_ids], 0)
    keys = torch.cat([pk, a.k], dim=2).to(ct)                                # [B, Hkv, P+Skv, D]
    vals = torch.cat([pv, a.v], dim=2).to(ct)
    keys = keys.repeat_interleave(G, dim=1)                                 # as HF's repeat_kv
    vals = vals.repeat_interleave(G, dim=1)
    s = torch.matmul(a.q.to(ct), keys.transpose(-1, -2)) * a.scale
    if a.softcap > 0:
        s = a.softcap * torch.tanh(s / a.softcap)
    vis = visible_mask(a)
    s = s.masked_fill(~vis, float("-inf"))
    # Rows with no visible key: max is -inf; shift by 0 instead so exp gives exact zeros.
    if s.shape[-1] == 0:
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    seen = l > 0
    l_safe = torch.where(seen, l, torch.ones_like(l))  # keeps log and 1/l finite under autograd
    p = e / l_safe
    out = torch.matmul(p, vals)
    lse = torch.where(seen, torch.log(l_safe) + m, torch.full_like(m, float("-inf"))).squeeze(-1)
    return out.to(a.q.dtype), lse.to(torch.float32 if ct != torch.float64 else ct)


def prefix_attention_ref(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                         prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                         window=None, softcap=None, return_lse=False, backend=None,
                         upcast=True):
    """Reference prefix attention (same signature as `prefix_attention`).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; prefix_k, prefix_v: [N, Hkv, P, D] or
    [Hkv, P, D]; returns out [B, Hq, Sq, D] (and lse [B, Hq, Sq]). Computed in float32
    (float64 for float64 inputs); `upcast=False` computes in the input dtype instead,
    which gives the same-dtype baseline of the flash-attention error rule. `backend` is
    accepted for signature compatibility and ignored.
    """
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                  window=window, softcap=softcap)
    out, lse = attention_from_args(a, upcast=upcast)
    return (out, lse) if return_lse else out
