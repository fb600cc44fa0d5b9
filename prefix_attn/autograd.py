"""One autograd rule for every backend: each backend is a (fwd, bwd) pair of torch ops with
the schemas of docs/INTERNALS.md, and `register_autograd` wires bwd as fwd's derivative."""
from __future__ import annotations

import contextlib

import torch

_registered = set()


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
     causal, scale, window, softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                          key_padding_mask, out, lse)
    ctx.flags = (causal, scale, window, softcap)
    # The LSE is differentiable (d lse_i / d s_ij = P_ij: its gradient folds into Delta); an
    # output nobody used arrives as None instead of a tensor of zeros
    ctx.set_materialize_grads(False)


_NO_DOUBLE_BACKWARD = (b"prefix_attention has no double backward: its gradients were computed "
                       b"with create_graph=True and are now being differentiated (a gradient "
                       b"penalty, a Hessian-vector product); compute those terms with "
                       b"prefix_attention_ref")


def _once_differentiable(grads, inputs):
    """``grads`` as they are, or (under create_graph=True with an input that requires grad)
    aliases whose own backward raises: differentiating them again must not silently give zeros
    (which is what a backward op without a derivative formula would give)."""
    needed = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not torch.is_grad_enabled() or not needed:
        return grads

    def alias(g):
        if g is None:
            return None
        g = g.detach()
        g.requires_grad_(True)
        return g

    # The inputs go through the error node too: its edges then lead to them, so asking for a
    # second derivative with respect to them (even with allow_unused=True) reaches it.
    err = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, len(grads) + len(needed))
    return tuple(err(*[alias(g) for g in grads], *needed)[:len(grads)])


def _autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing on a device type autocast
    does not know (``meta``: the torch backend runs on every device type)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _make_backward(bwd):
    def backward(ctx, dout, dlse):
        (q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
         out, lse) = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 12
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        if dlse is not None:
            # a query that sees no key has the constant lse -inf: the gradient arriving there
            # is dropped, as the reference's is (it can be NaN: logaddexp's backward of two
            # -inf), else 0 * NaN in its Delta reached dq and the dk of the row's real keys
            dlse = dlse.to(lse.dtype).masked_fill(lse == float("-inf"), 0.0).contiguous()
        # autocast off: a backward called inside an autocast region would otherwise recast
        # the kernels' float32 internals (the torch backend's GEMMs); no_grad: the ops have no
        # derivative of their own (see _once_differentiable)
        with _autocast_off(q.device.type), torch.no_grad():
            grads = bwd(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                        key_padding_mask, out, lse, dlse, *ctx.flags)
        dq, dk, dv, dpk, dpv = _once_differentiable(tuple(grads), (dout, dlse, q, k, v, prefix_k,
                                                                     prefix_v))
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None
    return backward


def register_autograd(fwd, bwd) -> None:
    """Register `bwd` as the derivative of the op `fwd` (idempotent)."""
    key = str(fwd)
    if key in _registered:
        return
    torch.library.register_autograd(fwd, _make_backward(bwd), setup_context=_setup_context)
    _registered.add(key)
