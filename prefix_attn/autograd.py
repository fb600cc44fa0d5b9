"""One autograd rule for every backend: each backend is a (fwd, bwd) pair of torch ops with
the schemas of docs/INTERNALS.md, and `register_autograd` wires bwd as fwd's derivative."""
from __future__ import annotations

import torch

_registered = set()


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
     causal, scale, window, softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                          key_padding_mask, out, lse)
    ctx.flags = (causal, scale, window, softcap)
    # The LSE is an auxiliary output: it carries no gradient (documented in the API).
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd):
    def backward(ctx, dout, _dlse):
        (q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
         out, lse) = ctx.saved_tensors
        # autocast off: a backward called inside an autocast region would otherwise recast
        # the kernels' float32 internals (the torch backend's GEMMs)
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv, dpk, dpv = bwd(dout.contiguous(), q, k, v, prefix_k, prefix_v,
                                       prefix_ids, prefix_lens, key_padding_mask, out, lse,
                                       *ctx.flags)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None
    return backward


def register_autograd(fwd, bwd) -> None:
    """Register `bwd` as the derivative of the op `fwd` (idempotent)."""
    key = str(fwd)
    if key in _registered:
        return
    torch.library.register_autograd(fwd, _make_backward(bwd), setup_context=_setup_context)
    _registered.add(key)
