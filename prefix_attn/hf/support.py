"""Which models prefixes can be served on (checked when a bank is attached), and where
they work but differ from PEFT."""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

from .. import model_info


@functools.lru_cache(maxsize=None)
def _module_uses_interface(module_name: str) -> bool:
    """Whether the transformers modeling module ``module_name`` dispatches attention through
    ``ALL_ATTENTION_FUNCTIONS`` (True when its source cannot be read: nothing to judge from)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True


def _layer_classes(model) -> set:
    """The transformers classes of ``model``'s modules that carry a layer index (the language
    model's attention, and layers): where its prefixes go."""
    return {type(m) for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
            and type(m).__module__.startswith("transformers.models.")}


def uses_attention_interface(model_or_class) -> bool:
    """Whether the model's attention dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``.

    For a model: judged from the modules of its layers (a vision-language wrapper such as
    LLaVA holds its language model's attention in another modeling module than its own),
    else from its class. For a class: the first class of its MRO defined under
    ``transformers.models``. True for classes outside transformers (nothing to judge from)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    own = [k for k in cls.__mro__ if k.__module__.startswith("transformers.models.")][:1]
    classes = own if cls is model_or_class else (_layer_classes(model_or_class) or own)
    return all(_module_uses_interface(k.__module__) for k in classes)


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
    if getattr(text, "model_type", None) == "falcon":
        return (f"{name}'s decoder layers do not pass keyword arguments on to their attention "
                "(no prefix reaches it: an error at the forward, ignored under torch.compile), "
                "and ALiBi Falcon adds its bias to a mask prefix_attn does not build; use PEFT "
                "for it")
    if not uses_attention_interface(model):
        return (f"{name} computes attention in its own code, not through transformers' "
                "AttentionInterface, so no attention implementation (prefix_attn included) can "
                "be plugged into it")
    try:
        model_info.model_dims(model)
    except ValueError as e:
        return f"{name}: {e}"
    if getattr(text, "num_kv_shared_layers", None) \
            or "reuse" in (getattr(text, "kv_sharing_modes", None) or ()):
        return (f"{name}'s layers reuse earlier layers' keys and values (KV sharing), and with "
                "them those layers' prefixes under PEFT; prefix_attn gives every layer its own "
                "prefix, so it does not support such models")
    if getattr(text, "relative_attention_num_buckets", None):
        return (f"{name} adds a T5-style relative position bias to its attention scores, which "
                "prefix_attn does not apply; use PEFT for it")
    if type(model).__module__.startswith("transformers.models.") \
            and "position_ids" not in inspect.signature(model.forward).parameters:
        return (f"{name}'s forward takes no position_ids, so the tokens after a prefix cannot be "
                "numbered from its length as PEFT numbers them; use PEFT for it")
    attention = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__name__.endswith("Attention")})
    if attention and not _layer_classes(model):
        return (f"{name}'s attention modules ({', '.join(attention)}) have no layer index, by "
                "which prefix_attn gives each layer its prefix")
    if getattr(text, "model_type", None) == "paligemma" or getattr(cfg, "model_type", None) == "paligemma":
        return (f"{name} numbers its positions from 1 and attends bidirectionally over its "
                "prompt, which prefix_attn's position shift and kernels do not follow yet")
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
