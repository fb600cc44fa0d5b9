"""The `triton` backend: the kernels of `prefix_attn.kernels` as torch ops.

`prefix_attn::triton_fwd` and `prefix_attn::triton_bwd` are `torch.library.triton_op`s with
the schemas of docs/INTERNALS.md; their bodies allocate the outputs and call the launchers
(which pass explicit strides through `wrap_triton`), so `torch.compile` traces into the
kernels without a graph break and the fake (meta) implementations come from tracing the
same bodies. Autograd is wired by `register_backend` (prefix_attn/autograd.py).

Where it runs: CUDA tensors; and CPU tensors when `TRITON_INTERPRET=1` (tests). Under the
interpreter the backend registers with a priority below `torch`, so `backend=None` never
picks the (slow) interpreter on CPU; ask for it with `backend="triton"`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor
try:  # private: what triton_op's own wrapper switches off around its body (torch 2.6+)
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # another torch: the op is always called through the dispatcher
    set_wrap_triton_enabled = None
from torch.library import custom_op, triton_op

import triton  # noqa: F401  (a missing triton makes this backend unavailable)

from prefix_attn.kernels import bwd as _bwd
from prefix_attn.kernels import decode as _decode
from prefix_attn.kernels import fwd as _fwd
from prefix_attn.kernels.autotune import (MAX_GRID_YZ, interpreting, sm_count, smem_budget,
                                          smem_shortfall)

from .backends import SWITCHES, Backend, register_backend
from .validation import AttnArgs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Under TRITON_INTERPRET=1 torch's wrap_triton hands back the raw interpreted kernel, which
# can be neither traced nor run on fake tensors: the ops are then opaque custom ops with
# shape-only fakes (same schema, same autograd); on GPU they are triton_ops.
_TRITON_OP = not interpreting()
_define_op = triton_op if _TRITON_OP else custom_op
# CUDA caps grid axes 1 and 2 at 65535 programs. The launches in kernels/ put only
# B * Hkv (rows x kv heads: launched in row slices that fit, `autotune.row_chunks`) or
# N * Hkv (entries x kv heads: the one limit left) there, plus the prefix dK/dV chunk count
# (at most 4 x the SM count) and Hkv; anything else that grows with the batch, the heads or
# Sq (B * Hq in _bwd_delta and _cascade_merge) is folded into axis 0
# (tests/test_numerics_edges.py checks every launch's grid).


CASCADE_ENV = "PREFIX_ATTN_TRITON_CASCADE"


def _cascade(q: Tensor, k: Tensor, prefix_k: Tensor) -> bool:
    """Forward path choice: the cascade (decode) kernels or the per-row kernel.

    $PREFIX_ATTN_TRITON_CASCADE = "1" forces the cascade, "0" the per-row kernel; unset or
    "auto" applies `kernels.decode.use_cascade`: Sq <= 16 and (the prefix bytes saved by
    reading each shared entry once per 64 packed queries instead of once per row are at least
    the own-KV bytes, or a per-row grid would fill less than half the GPU and Skv >= 512).
    The backward always uses the per-row
    kernels (the cascade's out and lse are the same quantities).
    """
    mode = os.environ.get(CASCADE_ENV) or "auto"
    if mode in ("0", "1"):
        return mode == "1" and q.shape[2] > 0
    if mode != "auto":
        raise ValueError(f"environment variable {CASCADE_ENV}={mode!r}: expected one of "
                         f"{', '.join(SWITCHES[CASCADE_ENV])} (or unset)")
    B, Hq, Sq, _ = q.shape
    N, Hkv, P, _ = prefix_k.shape
    return _decode.use_cascade(B, N, P, Sq, k.shape[2], Hkv=Hkv, sms=sm_count(q.device),
                               G=Hq // Hkv)


def _kernel_window(window: int, k: Tensor) -> int:
    """The window the kernels get: -1 (none) when it hides nothing. Own key j is visible to
    query i while (Skv - Sq + i) - j < window, a distance of at most Skv - 1, so a window of
    Skv or more is no window; the kernels then never add a window near 2**31 to int32
    positions (that wrapped: zero dK/dV, and reads before K/V when Sq > Skv)."""
    return -1 if window >= k.shape[2] else window


def _device_guard(t: Tensor):
    """The tensors' GPU made current for the launches: Triton launches on the current device
    and its stream, so tensors on cuda:1 while cuda:0 is current failed ("cannot be accessed
    from Triton") or, with peer access, raced with cuda:1's stream. Nothing to do for CPU
    tensors, for the current device, or while torch.compile traces (its wrapper guards)."""
    if type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _guard_for(t.device)


def _guard_for(device: torch.device):
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def _fwd_body(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
              prefix_ids: Tensor, prefix_lens: Tensor, key_padding_mask: Optional[Tensor],
              causal: bool, scale: float, window: int, softcap: float) -> Tuple[Tensor, Tensor]:
    """out [B, Hq, Sq, D] (q.dtype, contiguous), lse [B, Hq, Sq] fp32 (-inf: no visible key)."""
    B, Hq, Sq, D = q.shape
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    launch = _decode.cascade_fwd if _cascade(q, k, prefix_k) else _fwd.attn_fwd
    with _device_guard(q):
        launch(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
               out, lse, causal, scale, _kernel_window(window, k), softcap)
    return out, lse


triton_fwd = _define_op("prefix_attn::triton_fwd", mutates_args=())(_fwd_body)


def direct_fwd(*args) -> Tuple[Tensor, Tensor]:
    """What `prefix_attn::triton_fwd` runs, called as a Python function: no dispatcher, no
    custom-op wrapper (about 15 us a call; `api._run` takes it only where nothing would see
    the op: `api._nothing_intercepts`). Launches straight, as triton_op's own wrapper does
    (with wrap_triton enabled each launch went through its higher-order op)."""
    if _TRITON_OP:
        with set_wrap_triton_enabled(False):
            return _fwd_body(*args)
    return _fwd_body(*args)


@_define_op("prefix_attn::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
               prefix_v: Tensor, prefix_ids: Tensor, prefix_lens: Tensor,
               key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor,
               dlse: Optional[Tensor], causal: bool, scale: float, window: int, softcap: float
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v), each of its input's shape and dtype; deterministic."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=prefix_k.device)
    dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=prefix_v.device)
    with _device_guard(q):
        _bwd.attn_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens,
                      key_padding_mask, out, lse, dlse, dq, dk, dv, dpk, dpv, causal, scale,
                      _kernel_window(window, k), softcap)
    return dq, dk, dv, dpk, dpv


if interpreting():
    # shape-only fakes for the opaque interpreter ops (triton_op derives them on GPU)
    @triton_fwd.register_fake
    def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                  causal, scale, window, softcap):
        return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32))

    @triton_bwd.register_fake
    def _bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
                  out, lse, dlse, causal, scale, window, softcap):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


# The autotuned kernels of a call (forward and backward) and the configs each may take.
_TUNED_KERNELS = (("forward", "fwd", _fwd._attn_fwd.configs),
                  ("dK/dV (own keys)", "bwd", _bwd._bwd_dkdv_own.configs),
                  ("dK/dV (prefix)", "bwd", _bwd._bwd_dkdv_prefix.configs),
                  ("dQ", "bwd", _bwd._bwd_dq.configs))


@functools.lru_cache(maxsize=64)
def _smem_reason(block_d: int, elsize: int, budget: int) -> Optional[str]:
    """smem_shortfall of this backend's kernels, once per (head dim, dtype size, GPU budget):
    unsupported() runs at every attention call."""
    return smem_shortfall(_TUNED_KERNELS, block_d, elsize, budget)


def unsupported(a: AttnArgs) -> Optional[str]:
    """Why this call cannot run on the triton backend, or None."""
    B, Hq, Hkv, Sq, Skv, N, P, D = a.dims
    if a.q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {a.q.dtype} (supported: fp16, bf16, fp32)"
    if a.q.device.type == "cpu" and a.q.dtype == torch.bfloat16:
        return "bfloat16 is not computed correctly by the Triton CPU interpreter"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if a.q.device.type == "cuda":  # a GPU with less shared memory than an A100 (sm_86/89: 99 KiB)
        short = _smem_reason(_fwd.head_block(D), a.q.element_size(), smem_budget(a.q))
        if short:
            return short
    if N * Hkv > MAX_GRID_YZ:
        return (f"N * Hkv = {N * Hkv} (bank entries in the call x kv heads) exceeds the grid "
                f"limit {MAX_GRID_YZ}")
    return None


def _available() -> bool:
    # Cheap: no CUDA initialisation unless CUDA was already compiled in and present.
    return interpreting() or torch.cuda.is_available()


register_backend(Backend(
    name="triton",
    fwd=torch.ops.prefix_attn.triton_fwd.default,
    direct_fwd=direct_fwd if set_wrap_triton_enabled is not None or not _TRITON_OP else None,
    bwd=torch.ops.prefix_attn.triton_bwd.default,
    devices=("cuda", "cpu") if interpreting() else ("cuda",),
    priority=-10 if interpreting() else 100,
    is_available=_available,
    unsupported=unsupported,
    description="Triton kernels (prefix bank read in place, GQA packed, deterministic backward)",
    needs="a CUDA GPU (or, for tests on CPU tensors, TRITON_INTERPRET=1 set before importing triton)",
))
