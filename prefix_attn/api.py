"""The public entry point `prefix_attention`."""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from .backends import choose_backend
from .validation import normalize


# Device types torch.autocast knows (is_autocast_enabled raises for others, e.g. "meta").
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone")


def autocast_dtype(q):
    """The dtype `torch.autocast` gives attention on q's device, or None outside autocast."""
    if not torch._C._is_any_autocast_enabled():  # the common case, in 0.1 us instead of 1 us
        return None
    if not isinstance(q, torch.Tensor) or q.device.type not in _AUTOCAST_DEVICES \
            or not torch.is_autocast_enabled(q.device.type):
        return None
    return torch.get_autocast_dtype(q.device.type)


def _check_autodiff_mode(tensors) -> None:
    """Refuse what the ops cannot differentiate, instead of a silent zero tangent: forward-mode
    AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) and ``torch.func.grad`` (whose
    transform needs a functorch-style autograd rule). ``torch.vmap`` works over the float
    inputs and the padding mask."""
    if torch.compiler.is_compiling():
        # dynamo sees neither the inputs' tangents (unpack_dual misses them) nor the functorch
        # stack: any forward-AD level is refused (else the compiled graph gave a zero or no
        # tangent, silently). Conservative: a compiled call in a dual_level without tangents too.
        if forward_ad._current_level >= 0:
            raise NotImplementedError("prefix_attention has no forward-mode derivative "
                                      "(torch.func.jvp / jacfwd or torch.autograd.forward_ad "
                                      "around a compiled call)")
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        for interpreter in retrieve_all_functorch_interpreters():
            if interpreter.key() in (TransformType.Grad, TransformType.Jvp):
                raise NotImplementedError(
                    f"prefix_attention does not support torch.func.{interpreter.key().name.lower()} "
                    "(torch.vmap works); use torch.autograd.grad / .backward() for gradients")
    if forward_ad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
            for t in tensors):
        raise NotImplementedError("prefix_attention has no forward-mode derivative (a tangent "
                                  "was given through torch.autograd.forward_ad)")


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None,
                     prefix_lens=None, key_padding_mask=None, causal=True, scale=None,
                     window=None, softcap=None, return_lse=False, backend=None):
    """Fused attention over a bank of prefixes and each row's own keys.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; prefix_k, prefix_v: [N, Hkv, P, D] or
    [Hkv, P, D] (or None); prefix_ids: [B] ints in [0, N); prefix_lens: [N] ints in [0, P];
    key_padding_mask: bool [B, Skv] (True = real token). Returns out [B, Hq, Sq, D] in q's
    dtype, and with `return_lse=True` also lse [B, Hq, Sq] float32 (float64 for float64
    inputs; differentiable: a loss may use it, e.g. to merge this attention with another
    by LSE).
    Row b, query head h, query i sees the first `prefix_lens[prefix_ids[b]]` positions of
    bank entry `prefix_ids[b]` (always visible: no causal, window or padding mask), then the
    own keys j that are real (`key_padding_mask`), with `causal`: j <= Skv - Sq + i
    (bottom-right aligned), and with `window`: (Skv - Sq + i) - j < window. Query head h reads
    kv head h // (Hq // Hkv) (GQA / MQA). Scores are scaled by `scale` (default D ** -0.5)
    and, with `softcap`, become softcap * tanh(s / softcap) before the softmax. A query that
    sees no key gives zeros and lse -inf, never NaN. Gradients reach q, k, v and the bank; an
    entry's is the sum over the rows that select it (deterministic), positions past its
    length get zeros. The full contract: docs/DESIGN.md §2 (in the repository and the sdist).
    `backend`: "triton" | "cuda" | "cpu" | "torch" | None (None: $PREFIX_ATTN_BACKEND or the
    best available for the device).

    Under `torch.autocast` the floating inputs but float64 ones are cast to the autocast dtype
    first, as autocast does for `F.scaled_dot_product_attention` (so float32 q/k from a RoPE, a
    bfloat16 v and float32 trainable prefixes mix), and the kernels run with autocast off;
    gradients come back in each input's own dtype.
    """
    _check_autodiff_mode((q, k, v, prefix_k, prefix_v))
    cast = autocast_dtype(q)
    if cast is None:
        return _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                    causal, scale, window, softcap, return_lse, backend)
    # autocast's rule: floating tensors are cast, float64 ones never (a float64 model stays so)
    q, k, v, prefix_k, prefix_v = (t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                   and t.dtype != torch.float64 else t
                                   for t in (q, k, v, prefix_k, prefix_v))
    with torch.autocast(q.device.type, enabled=False):
        return _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                    causal, scale, window, softcap, return_lse, backend)


def _run(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask, causal, scale,
         window, softcap, return_lse, backend):
    a = normalize(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, prefix_lens=prefix_lens,
                  key_padding_mask=key_padding_mask, causal=causal, scale=scale, window=window,
                  softcap=softcap)
    b = choose_backend(a, backend)
    if b.name == "triton" and torch.jit.is_tracing():
        # a trace keeps no range check (the host's ran once, at trace time; a device assert is
        # dropped as dead code) and the triton op checks nothing itself (the others do)
        raise NotImplementedError(
            "torch.jit.trace of prefix_attention on the triton backend: the trace would keep no "
            "check of prefix_ids / prefix_lens (out-of-bounds reads on other inputs); use "
            "torch.compile or torch.export, or backend='cuda' / 'torch' in the traced module")
    if _records_autograd(a):
        out, lse = b.fwd(*a.op_args())
    elif b.direct_fwd is not None and _nothing_intercepts(a):
        # the op's Python body without the dispatcher and the custom-op wrapper around it
        out, lse = b.direct_fwd(*a.op_args())
    else:
        # nothing to differentiate (no_grad / inference_mode, or no input requiring grad, as in
        # serving): skip the ops' autograd layer, whose Python wrapper costs about 4 us a call
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = b.fwd(*a.op_args())
    return (out, lse) if return_lse else out


def _records_autograd(a) -> bool:
    """Whether the call goes through the autograd layer (always inside torch.compile and under
    functorch transforms, which handle that layer themselves)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if not torch.is_grad_enabled():
        return False
    return a.q.requires_grad or a.k.requires_grad or a.v.requires_grad \
        or a.prefix_k.requires_grad or a.prefix_v.requires_grad


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _nothing_intercepts(a) -> bool:
    """Whether the dispatcher would hand a call that records no autograd straight to the op's
    Python body: no tensor subclass (fake, functional, DTensor: `type` is exact), no
    TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode), no TorchFunctionMode
    (`with torch.device(...)` included) and no profiler (it records the op by name)."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._autograd._profiler_enabled():
        return False
    kpm = a.key_padding_mask
    return type(a.q) in _PLAIN and type(a.k) in _PLAIN and type(a.v) in _PLAIN \
        and type(a.prefix_k) in _PLAIN and type(a.prefix_v) in _PLAIN \
        and type(a.prefix_ids) in _PLAIN and type(a.prefix_lens) in _PLAIN \
        and (kpm is None or type(kpm) in _PLAIN)
