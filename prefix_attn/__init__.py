"""prefix_attn: fused attention kernels for prefix tuning and shared-prefix serving."""
import importlib as _importlib
import os as _os
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_ref", "available_backends", "PrefixBank",
           "PrefixSelection", "prefix_tuning", "from_peft", "trainable_parameters",
           "get_nb_trainable_parameters", "print_trainable_parameters", "enable_checkpointing",
           "unload", "load_prefixes",
           "__version__"]


def _load() -> None:
    """Everything ``import prefix_attn`` does (done by the import itself, except in the
    ``prefix-attn`` command, whose ``main`` calls this once its arguments are parsed)."""
    global _loaded
    if _loaded:
        return
    from . import api, backends, bank, checkpoint, reference, tuning

    # Backends register their ops now (not lazily inside a call) so that torch.compile never
    # traces an import. Optional backends that fail to load are listed by backends.load_errors().
    backends.load_backends()

    # Hugging Face integration: importing hf registers attn_implementation "prefix_attn" when
    # transformers is installed (and does nothing otherwise).
    _importlib.import_module(".hf", __name__)
    names = {"prefix_attention": api, "prefix_attention_ref": reference, "available_backends": backends,
             "load_backends": backends, "PrefixBank": bank, "PrefixSelection": bank,
             "load_prefixes": checkpoint}
    names.update((n, tuning) for n in __all__ if n not in names and n != "__version__")
    globals().update((n, getattr(module, n)) for n, module in names.items())
    _loaded = True


if _TYPE_CHECKING:  # the public names, for type checkers and editors (set by _load at run time)
    from .api import prefix_attention
    from .backends import available_backends
    from .bank import PrefixBank, PrefixSelection
    from .checkpoint import load_prefixes
    from .reference import prefix_attention_ref
    from .tuning import (enable_checkpointing, from_peft, get_nb_trainable_parameters, prefix_tuning,
                         print_trainable_parameters, trainable_parameters, unload)


def _is_the_command() -> bool:
    """Whether this process is the ``prefix-attn`` console script (the file pip writes for the
    entry point runs as ``__main__``). Its ``--help`` and usage errors then answer without
    torch and transformers (seconds of imports); ``prefix_attn.cli.main`` loads them after
    parsing. Any other import of the package (``python -m prefix_attn.cli`` included) loads
    everything at once, as it always did."""
    main = _sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or ""
    name = _os.path.basename(path)
    if name == "__main__.py":  # Windows: pip's prefix-attn.exe runs the script as a zip's __main__.py
        name = _os.path.basename(_os.path.dirname(path))
    if name not in ("prefix-attn", "prefix-attn-script.py", "prefix-attn.exe"):
        return False
    # that script (pip's, pipx's, uv's), not any program of that name: one that does not hand
    # over to prefix_attn.cli.main would never load the package (nor register "prefix_attn")
    try:
        source = main.__loader__.get_source(main.__name__) or ""
    except Exception:  # no loader, no source: load everything, as any other import does
        return False
    return "from prefix_attn.cli import main" in source


_loaded = False
if _is_the_command():
    def __getattr__(name: str):
        """The public names of a package imported by the command before :func:`_load`."""
        if name in __all__ or name == "load_backends":
            _load()
            return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    _load()
