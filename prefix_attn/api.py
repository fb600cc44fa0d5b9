"""The public entry point `prefix_attention`."""
from __future__ import annotations

from .backends import choose_backend
from .validation import normalize


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
    """
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window,
                  softcap=softcap)
    b = choose_backend(a, backend)
    out, lse = b.fwd(*a.op_args())
    return (out, lse) if return_lse else out
