"""Which models prefixes can be served on (checked when a bank is attached), and where
they work but differ from PEFT."""
from __future__ import annotations

import functools
import inspect
from typing import Optional

@functools.lru_cache(maxsize=None)
def uses_attention_interface(cls) -> bool:
    """Whether the transformers modeling module of ``cls`` (the first class of its MRO defined
    under ``transformers.models``) dispatches attention through ``ALL_ATTENTION_FUNCTIONS``;
    True for classes outside transformers (nothing to judge from)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("transformers.models."):
            try:
                return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(inspect.getmodule(klass))
            except (OSError, TypeError):
                return True
    return True


def _peft_wrapper(model) -> Optional[str]:
    """Why a bank cannot go on a PEFT wrapper (``PeftModel``), or None for other models: with
    prompt-learning adapters PEFT applies its own prefix on top of the bank's; with others
    (LoRA, ...) its forward takes no ``position_ids``, so the tokens after a prefix would not
    be numbered from its length."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "get_base_model"):
        return None
    name = type(model).__name__
    kinds = sorted({str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1] for c in configs.values()
                    if getattr(c, "is_prompt_learning", False)})
    if kinds:
        return (f"{name} is a PEFT model with {', '.join(kinds)} adapters, which PEFT applies "
                "itself, on top of a bank's prefixes: take prefix-tuning adapters over with "
                "prefix_attn.from_peft(peft_model), or use the base model "
                "(peft_model.get_base_model())")
    return (f"{name} is a PEFT wrapper: attach the bank to its base model "
            "(peft_model.get_base_model(), which holds the adapters) and call that")


def unsupported_model(model) -> Optional[str]:
    """Why prefixes cannot be served on ``model`` (None: they can): a PEFT wrapper (attach to
    its base model, or take prefix-tuning adapters over with from_peft), an encoder-decoder,
    keys and values of different head dims (multi-head latent attention), or attention computed
    in the model's own code instead of through transformers' attention interface."""
    wrapper = _peft_wrapper(model)
    if wrapper is not None:
        return wrapper
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model: PEFT puts a prefix on its decoder's self- "
                "and cross-attention, which prefix_attn does not do (decoder-only and encoder "
                "models only); use PEFT for it")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "kv_lora_rank", None) or getattr(text, "qk_rope_head_dim", None):
        return (f"{name} uses multi-head latent attention (keys and values of different head "
                "dims), which the prefix bank and kernels do not support")
    if not uses_attention_interface(type(model)):
        return (f"{name} computes attention in its own code, not through transformers' "
                "AttentionInterface, so no attention implementation (prefix_attn included) can "
                "be plugged into it")
    return None


def model_caveat(model) -> Optional[str]:
    """Where prefixes on ``model`` work but differ from PEFT (a warning at attach), or None."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk:
        return (f"{type(model).__name__} uses chunked attention ({chunk} tokens): a prefix stays "
                "visible to every token, where PEFT's prefix (the first positions of the cache) "
                "is hidden from tokens past the first chunk")
    return None
