"""Hugging Face transformers integration: attention function, mask function, ``prefixes=`` hook.

Modules: ``names`` (registered names, keywords), ``mask`` (the mask function),
``attention`` (the attention function and its eager fallback), ``hooks`` (``prefixes=`` on a
forward), ``positions`` (positions after a prefix), ``generate`` (``generate(prefixes=...)``),
``support`` (which models can take prefixes). This module re-exports their public names.

``register()`` (called by ``import prefix_attn``) adds, under the name ``"prefix_attn"``:

- ``attention_forward`` to ``AttentionInterface``: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, Skv, D]``
  (HF's layout) go to :func:`prefix_attn.prefix_attention` with the row's prefixes, the
  key padding mask, ``causal`` (``module.is_causal``), ``window`` (``sliding_window``),
  ``scale`` (``scaling``) and ``softcap``; returns ``([B, S, Hq, D], None)`` as HF expects.
- ``padding_mask`` to ``AttentionMaskInterface``: for the causal, sliding-window causal and
  bidirectional patterns it returns only the 2-D padding mask ``[B, kv_length]`` (or None
  when nothing is padded), never a dense 4-D mask. Packed sequences get their sequence ids
  (an int64 ``[B, kv]`` tensor, marked), which the attention function regroups one sequence
  per kernel row (``prefix_attn/packed.py``); inside torch.compile, where regrouping needs host
  syncs, they take the eager fallback with a dense mask built from them, unless the pre-hook
  already found the sequences and their regrouping (``prefixes=``: one graph). A static cache's prefill gets the padding mask of
  its filled slots only, and the attention function cuts K/V to that length. Anything else
  (custom mask overlays) gets a dense bool mask ``[B, 1, q, kv]``, which the attention
  function sends to the eager fallback below.
- ``"prefixes"`` as an optional key of ``TransformersKwargs``, so that ``generate`` accepts
  ``prefixes=`` and forwards it to every forward call.

How ``prefixes=`` reaches the attention: ``install_hooks(model)`` (called by
``PrefixBank.attach``) registers a forward pre-hook (with kwargs) on the model. It pops
``prefixes``, builds a :class:`~prefix_attn.bank.PrefixSelection` with ``model.prefix_bank``,
shifts ``position_ids`` by each row's prefix length (PEFT numbers the tokens after a prefix of
length P from P) and passes the selection down as the keyword ``prefix_selection``.
``prefixes`` is a list of names / bank ids / None ("" = None) per row, a LongTensor of bank ids,
or one name for every row. ``register()`` wraps ``GenerationMixin.generate`` (a no-op without
``prefixes=`` and a bank): it turns the list into an id tensor, which generate expands with the
rows for ``num_return_sequences`` and beams, and pins the bank for the call
(``PrefixBank.pinned``: other tenants' changes do not reach a running request). Every
supported family forwards ``**kwargs`` from the model's forward to the attention function,
and keywords survive gradient checkpointing (HF checkpoints ``partial(forward, **kwargs)``),
which a context variable would not (the backward replay runs outside the forward's context).
A post-hook checks that the attention function read the selection; a model that drops the
keyword raises instead of silently ignoring the prefixes (on eager forwards: inside a compiled
graph the attention function cannot record the read).

Cases the kernels do not cover (a dense mask, attention dropout in training,
``output_attentions``, attention sinks, value head dims unlike the key's) run
:func:`eager_prefix_attention`, a plain PyTorch composite over ``[prefix; own keys]``, after a
one-time warning. What neither path can do raises: position biases (T5), and
:func:`unsupported_model` (encoder-decoders, multi-head latent attention, models computing
attention in their own code) is checked when a bank is attached.
"""

from __future__ import annotations

from .attention import attention_forward, eager_prefix_attention
from .generate import _wrap_generate
from .hooks import cache_kwarg, install_hooks
from .mask import mask_pattern, packed_from_positions, packed_sequence_ids, padding_mask
from .names import ATTN_NAME, PACKED_ATTR, PREFIXES_KWARG, SELECTION_KWARG
from .positions import learned_position_limit
from .support import attn_implementation, model_caveat, unsupported_model, uses_attention_interface

__all__ = ["ATTN_NAME", "PACKED_ATTR", "PREFIXES_KWARG", "SELECTION_KWARG", "attention_forward",
           "attn_implementation",
           "cache_kwarg", "eager_prefix_attention", "install_hooks", "learned_position_limit",
           "mask_pattern", "model_caveat", "packed_from_positions", "packed_sequence_ids",
           "padding_mask", "register", "unsupported_model", "uses_attention_interface"]

_registered = False


def register() -> bool:
    """Register ``"prefix_attn"`` with transformers (idempotent). False if transformers is missing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask)
    try:  # generate() validates model kwargs against TransformersKwargs' keys
        from transformers.utils.generic import TransformersKwargs

        keys = getattr(TransformersKwargs, "__optional_keys__", None)
        if keys is not None and PREFIXES_KWARG not in keys:
            TransformersKwargs.__optional_keys__ = frozenset(keys | {PREFIXES_KWARG, SELECTION_KWARG})
    except ImportError:
        pass
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        GenerationMixin = None
    if GenerationMixin is not None and not getattr(GenerationMixin.generate, "_prefix_attn_wrapped", False):
        GenerationMixin.generate = _wrap_generate(GenerationMixin.generate)
    _registered = True
    return True


register()
