"""Make Triton's CPU interpreter (3.2-3.6; 3.7+ does this itself) work with NumPy >= 2.4.

The interpreter converts a scalar tensor to a Python int (``range`` bounds, ``__index__``)
with ``int(handle.data)``, but scalars are stored as 1-element 1-D arrays, which NumPy 2.4
refuses to convert. We wrap its patching hook to use ``.item()`` instead. Only applied
under ``TRITON_INTERPRET=1``; compiled kernels are untouched.
"""


def apply() -> None:
    """Install the shim once (idempotent); no-op if the interpreter's layout changed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_prefix_attn_compat", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):  # Triton <= 3.5 passes the tensor class alone, 3.6+ a scope too
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._prefix_attn_compat = True
    interpreter._patch_lang_tensor = patched
