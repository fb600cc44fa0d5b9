"""Triton device code of prefix_attn (installed as ``prefix_attn.kernels``).

Modules: ``fwd`` (per-row forward), ``bwd`` (backward: Delta, own dK/dV, prefix-major
dprefix, dQ), ``decode`` (cascade forward for small Sq), ``common`` (shared device helpers),
``autotune`` (configs, pruning, PREFIX_ATTN_TRITON_ONE_CONFIG), ``interpreter_compat``
(Triton 3.6 interpreter + NumPy 2.4 shim). ``fwd.attn_fwd``, ``bwd.attn_bwd`` and
``decode.cascade_fwd`` are thin launchers taking tensors and passing explicit strides; the
host layer (``prefix_attn.triton_backend``) registers them as torch ops.
"""

from .autotune import interpreting as _interpreting

if _interpreting():
    from . import interpreter_compat as _compat

    _compat.apply()
