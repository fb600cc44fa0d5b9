"""The public entry point `prefix_attention`."""
from __future__ import annotations

import torch

from .backends import choose_backend
from .validation import normalize


def _autocast_dtype(q):
    """The dtype `torch.autocast` gives attention on q's device, or None outside autocast."""
    if not isinstance(q, torch.Tensor) or not torch.is_autocast_enabled(q.device.type):
        return None
    return torch.get_autocast_dtype(q.device.type)


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                     prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                     window=None, softcap=None, return_lse=False, backend=None):
    """Fused attention over a bank of prefixes and each row's own keys.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; prefix_k, prefix_v: [N, Hkv, P, D] or
    [Hkv, P, D] (or None); prefix_ids: [B] ints in [0, N); prefix_lens: [N] ints in [0, P];
    key_padding_mask: bool [B, Skv] (True = real token). Returns out [B, Hq, Sq, D] in q's
    dtype, and with `return_lse=True` also lse [B, Hq, Sq] float32 (not differentiable).
    Semantics: ../shared/DESIGN.md §2. `backend`: "triton" | "cuda" | "cpu" | "torch" | None
    (None: $PREFIX_ATTN_BACKEND or the best available for the device).

    Under `torch.autocast` the floating inputs are cast to the autocast dtype first, as
    autocast does for `F.scaled_dot_product_attention` (so float32 q/k from a RoPE, a
    bfloat16 v and float32 trainable prefixes mix), and the kernels run with autocast off;
    gradients come back in each input's own dtype.
    """
    cast = _autocast_dtype(q)
    if cast is None:
        return _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                    causal, scale, window, softcap, return_lse, backend)
    q, k, v, prefix_k, prefix_v = (t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                   else t for t in (q, k, v, prefix_k, prefix_v))
    with torch.autocast(q.device.type, enabled=False):
        return _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                    causal, scale, window, softcap, return_lse, backend)


def _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask, causal, scale,
         window, softcap, return_lse, backend):
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window,
                  softcap=softcap)
    b = choose_backend(a, backend)
    out, lse = b.fwd(*a.op_args())
    return (out, lse) if return_lse else out
