"""prefix_attn: fused attention kernels for prefix tuning and shared-prefix serving."""
from .api import prefix_attention
from .backends import available_backends, load_backends
from .reference import prefix_attention_ref

# Backends register their ops now (not lazily inside a call) so that torch.compile never
# traces an import. Optional backends that fail to load are listed by backends.load_errors().
load_backends()

# Hugging Face integration: importing hf registers attn_implementation "prefix_attn" when
# transformers is installed (and does nothing otherwise).
from . import hf as _hf  # noqa: E402,F401
from .bank import PrefixBank, PrefixSelection  # noqa: E402
from .tuning import (enable_checkpointing, from_peft, get_nb_trainable_parameters,  # noqa: E402
                     prefix_tuning, print_trainable_parameters, trainable_parameters, unload)
from .checkpoint import load_prefixes  # noqa: E402

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_ref", "available_backends", "PrefixBank",
           "PrefixSelection", "prefix_tuning", "from_peft", "trainable_parameters",
           "get_nb_trainable_parameters", "print_trainable_parameters", "enable_checkpointing",
           "unload", "load_prefixes",
           "__version__"]
