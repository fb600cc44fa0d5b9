"""The `cpu` and `cuda` backends: the C++/CUDA extension `prefix_attn._C` (sources in csrc/).

The extension registers the ops `torch.ops.prefix_attn.fwd` / `.bwd` through TORCH_LIBRARY
(schemas in docs/INTERNALS.md). This module loads it, registers the fake (meta) kernels used
by `torch.compile` and `opcheck`, and registers the two backends. A missing extension (not
built, PREFIX_ATTN_NO_EXT=1) raises ImportError here, which the backend registry reports as
"not available" instead of failing.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .backends import Backend, register_backend
from .validation import AttnArgs

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def _load_extension() -> None:
    """Loads prefix_attn._C, or the library named by $PREFIX_ATTN_EXT_LIB (a CMake build)."""
    lib = os.environ.get("PREFIX_ATTN_EXT_LIB")
    if lib:
        torch.ops.load_library(lib)
    else:
        try:
            from . import _C  # noqa: F401  (importing registers the ops)
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) or "cannot import name '_C'" in str(exc)
            why = "is not built" if missing else f"does not load ({exc})"
            raise ImportError(
                f"the C++ extension prefix_attn._C {why}: build it with `pip install --no-build-isolation -e .` (or "
                "`make setup`) where a C++ compiler is available, without PREFIX_ATTN_NO_EXT=1; "
                "the triton and torch backends work without it") from None


_load_extension()
_fwd = torch.ops.prefix_attn.fwd.default
_bwd = torch.ops.prefix_attn.bwd.default


@torch.library.register_fake("prefix_attn::fwd")
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask, causal,
              scale, window, softcap):
    """out [B, Hq, Sq, D] (q's dtype, contiguous), lse [B, Hq, Sq] float32."""
    B, Hq, Sq, D = q.shape
    out = q.new_empty((B, Hq, Sq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("prefix_attn::bwd")
def _bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lens, key_padding_mask,
              out, lse, dlse, causal, scale, window, softcap):
    """Contiguous gradients with the shapes and dtypes of q, k, v, prefix_k, prefix_v."""
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


def _unsupported(args: AttnArgs) -> Optional[str]:
    if args.q.dtype not in _KERNEL_DTYPES:
        return f"dtype {args.q.dtype} (the C++ kernels take float32, float16, bfloat16)"
    if args.q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {args.q.shape[-1]} > {_MAX_HEAD_DIM}"
    return None


def _cuda_built() -> bool:
    """True when the extension has CUDA kernels and a GPU exists (no CUDA init at import)."""
    if not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("prefix_attn::fwd", "CUDA")


register_backend(Backend(
    name="cpu", fwd=_fwd, bwd=_bwd, devices=("cpu",), priority=20,
    unsupported=_unsupported,
    description="C++ extension: tiled online softmax on BLAS tiles, parallel over "
                "(row, kv head, query tile); deterministic prefix-major backward"))

register_backend(Backend(
    name="cuda", fwd=_fwd, bwd=_bwd, devices=("cuda",), priority=10,
    is_available=_cuda_built, unsupported=_unsupported,
    description="C++/CUDA extension: tiled shared-memory kernels (fallback for Triton)",
    needs="a CUDA GPU and the extension built with its CUDA part (nvcc at install time)"))
