"""Triton device code of prefix_attn (installed as ``prefix_attn.kernels``).

Modules: ``fwd`` (per-row forward), ``bwd`` (backward: Delta, own dK/dV, prefix-major
dprefix, dQ), ``decode`` (cascade forward for small Sq), ``common`` (shared device helpers),
``autotune`` (configs, pruning, PREFIX_ATTN_TRITON_ONE_CONFIG), ``interpreter_compat``
(Triton 3.6 interpreter + NumPy 2.4 shim). ``fwd.attn_fwd``, ``bwd.attn_bwd`` and
``decode.cascade_fwd`` are thin launchers taking tensors and passing explicit strides; the
host layer (``prefix_attn.triton_backend``) registers them as torch ops.

In a checkout this folder is also importable as a top-level ``kernels`` whenever the
checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -c`` run there). That
name belongs to PyPI's ``kernels`` (Hugging Face's hub kernels), which transformers >= 5.25
depends on and imports: imported under that name, this file loads PyPI's package in its
place (or, when it is not installed, stays an empty module without a version, which
transformers treats as absent).
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _a_checkout(entry) -> bool:  # this one or another copy of it (never hand over to those)
        return not isinstance(entry, str) or _os.path.isfile(
            _os.path.join(entry or _os.curdir, "kernels", "interpreter_compat.py"))

    _elsewhere = [p for p in _sys.path if not _a_checkout(p)]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # what `import kernels` returns from here on
        _spec.loader.exec_module(_module)
else:
    from .autotune import interpreting as _interpreting

    if _interpreting():
        from . import interpreter_compat as _compat

        _compat.apply()
