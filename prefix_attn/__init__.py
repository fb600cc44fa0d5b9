"""prefix_attn: fused attention kernels for prefix tuning and shared-prefix serving."""
from .api import prefix_attention
from .backends import available_backends
from .reference import prefix_attention_ref

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_ref", "available_backends", "__version__"]
