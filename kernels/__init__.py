"""Triton device code of prefix_attn (installed as ``prefix_attn.kernels``).

``fwd.attn_fwd`` and ``bwd.attn_bwd`` are thin launchers taking tensors and passing
explicit strides; the host layer (``prefix_attn.triton_backend``) registers them as
torch ops.
"""

from .autotune import interpreting as _interpreting

if _interpreting():
    from . import interpreter_compat as _compat

    _compat.apply()
