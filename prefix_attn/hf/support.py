"""Which models prefixes can be served on (checked when a bank is attached), and where
they work but differ from PEFT."""
from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Optional

from .. import model_info
from . import code_checks

# model types the bank cannot serve, and why: most do more with the cached keys and values
# than the attention function sees (a prefix given to it alone would differ from PEFT's); the
# last ones need image inputs at every forward, which prefixes= refuses
_DIFFERENT_ATTENTION = {
    "diffllama": "splits each value head in two and repeats the halves after the cache "
                 "(differential attention), which the bank's prefix values would skip",
    "jetmoe": "repeats its keys and values for each selected expert after the cache, which the "
              "bank's prefix would not be",
    "doge": "adds a mask computed from its values (cached ones included) to the attention "
            "scores, which the prefix columns would lack",
    "hrm_text": "runs its stack of layers several times, each pass caching as other layers, "
                "while its attention reads the prefix of its first pass's layer index",
    "recurrent_gemma": "restarts its recurrent layers' state where position_ids is 0, which "
                       "the tokens after a prefix never have (they are numbered from its "
                       "length): the state of an earlier call would leak into the next",
    "kosmos-2": "needs image inputs at every forward, which prefixes= cannot be combined with "
                "(their positions are not shifted past a prefix)",
    "idefics": "needs image inputs at every forward, which prefixes= cannot be combined with "
               "(their positions are not shifted past a prefix)",
}


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


def attn_implementation(model) -> Optional[str]:
    """The attention implementation of the model's language layers, where prefixes go: its
    text config's (a vision-language model whose vision tower cannot switch implementations,
    such as GOT-OCR2, keeps its top-level config on "eager" while its language model runs
    "prefix_attn")."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)


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


# The oldest transformers release the integration is tested on (the HF tests pass on 5.15.1,
# 5.17.0, 5.24.0 and 5.25.0). On 5.12.1 its checks missed T5's position bias and layers of
# different head dims (a bank attached where its prefixes would be wrong); 5.0.0 failed more.
MIN_TRANSFORMERS = (5, 15)


def transformers_too_old(version: Optional[str] = None) -> Optional[str]:
    """Why the installed transformers (or ``version``) is too old for a prefix bank, else None."""
    if version is None:
        import transformers

        version = transformers.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(int(x) for x in found.groups()) >= MIN_TRANSFORMERS:
        return None
    floor = ".".join(map(str, MIN_TRANSFORMERS))
    return (f"transformers {version} is older than {floor}, the oldest release prefix_attn's "
            f"Hugging Face integration is tested on (older ones hid position biases and per-layer "
            f"head dims from its checks); upgrade: pip install -U 'transformers>={floor}'")


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
    old = transformers_too_old() if "transformers" in sys.modules else None
    if old is not None:
        return old
    if getattr(cfg, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model: PEFT puts a prefix on its decoder's self- "
                "and cross-attention, which prefix_attn does not do (decoder-only and encoder "
                "models only); use PEFT for it")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "kv_lora_rank", None) or getattr(text, "qk_rope_head_dim", None):
        return (f"{name} uses multi-head latent attention (keys and values of different head "
                "dims), which the prefix bank and kernels do not support")
    v_head_dim = getattr(text, "v_head_dim", None)
    if v_head_dim and v_head_dim != getattr(text, "head_dim", v_head_dim):
        return (f"{name}'s values have another head dim ({v_head_dim}) than its keys "
                f"({text.head_dim}), which the prefix bank and kernels do not support")
    kind = next((t for t in (getattr(text, "model_type", None), getattr(cfg, "model_type", None))
                 if t in _DIFFERENT_ATTENTION), None)
    if kind is not None:
        return (f"{name} {_DIFFERENT_ATTENTION[kind]}; prefix_attn does not support it: use PEFT "
                "for it")
    if not uses_attention_interface(model):
        return (f"{name} computes attention in its own code, not through transformers' "
                "AttentionInterface, so no attention implementation (prefix_attn included) can "
                "be plugged into it")
    if getattr(text, "relative_attention_num_buckets", None):
        return (f"{name} adds a T5-style relative position bias to its attention scores, which "
                "prefix_attn does not apply; use PEFT for it")
    own = _own_attention(model)
    if own is not None:
        return own
    try:
        num_layers = model_info.model_dims(model)[0]
    except ValueError as e:
        return f"{name}: {e}"
    if getattr(text, "num_kv_shared_layers", None) \
            or "reuse" in (getattr(text, "kv_sharing_modes", None) or ()):
        return (f"{name}'s layers reuse earlier layers' keys and values (KV sharing), and with "
                "them those layers' prefixes under PEFT; prefix_attn gives every layer its own "
                "prefix, so it does not support such models")
    if "indexed_attention" in (getattr(text, "layer_types", None) or ()):
        return (f"{name}'s indexed-attention layers pick the key blocks each query reads with an "
                "indexer that reads the dense attention mask itself, which prefix_attn does not "
                "build (and which holds no keys for a prefix)")
    if type(model).__module__.startswith("transformers.models.") \
            and "position_ids" not in inspect.signature(model.forward).parameters:
        return (f"{name}'s forward takes no position_ids, so the tokens after a prefix cannot be "
                "numbered from its length as PEFT numbers them; use PEFT for it")
    attention = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__name__.endswith("Attention")})
    if attention and not _layer_classes(model):
        return (f"{name}'s attention modules ({', '.join(attention)}) have no layer index, by "
                "which prefix_attn gives each layer its prefix")
    shared = _shared_attention(model, num_layers)
    if shared is not None:
        return shared
    if getattr(text, "model_type", None) == "paligemma" or getattr(cfg, "model_type", None) == "paligemma":
        return (f"{name} numbers its positions from 1 and attends bidirectionally over its "
                "prompt, which prefix_attn's position shift and kernels do not follow yet")
    return None


def _shared_attention(model, num_layers: int) -> Optional[str]:
    """Why the model's self-attention has no layer index of its own (None: each has one): one
    module shared by several layers and told the cache index at each call (Zamba2 builds it
    with layer_idx -1, Zamba with none), which the attention function never sees."""
    outside = sorted({f"{type(m).__name__} (layer_idx {m.layer_idx})"
                      for _, m in code_checks.self_attention_modules(model)
                      if not 0 <= m.layer_idx < num_layers})
    home = type(model).__module__
    unindexed = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__module__ == home and home.startswith("transformers.models.")
                        and type(m).__name__.endswith("Attention")
                        and not any(w in type(m).__name__ for w in ("Cross", "Vision", "Audio"))
                        and getattr(m, "layer_idx", 0) is None})
    if not outside and not unindexed:
        return None
    return (f"{type(model).__name__}'s attention ({', '.join(outside + unindexed)}) has no "
            f"layer index among its {num_layers} layers: a module shared by several layers, "
            "given the cache index at each call, which prefix_attn cannot read to pick each "
            "layer's prefix; use PEFT for it")


def _own_attention(model) -> Optional[str]:
    """Why the model's self-attention modules, read from their source, cannot get a prefix
    (None: nothing found): they compute attention themselves, or a call on the way down to them
    does not pass ``**kwargs`` on (an error at each eager forward, and silently no prefix under
    torch.compile), or they hand the attention function a position bias it does not add."""
    name = type(model).__name__
    classes = {type(m) for _, m in code_checks.self_attention_modules(model)}
    if classes and all(code_checks.computes_attention_itself(c) for c in classes):
        return (f"{name}'s attention ({', '.join(sorted(c.__name__ for c in classes))}) is "
                "computed in its own code, not through transformers' AttentionInterface, so no "
                "attention implementation (prefix_attn included) can be plugged into it")
    dropped = code_checks.kwargs_dropped_on_the_way(model)
    if dropped is not None:
        return (f"{name}: its call of {dropped} does not pass keyword arguments on to its "
                "attention, so no prefix would reach it (an error at each forward, and ignored "
                "silently under torch.compile); use PEFT for it")
    biased = sorted(c.__name__ for c in classes if code_checks.passes_position_bias(c))
    if biased:
        return (f"{name}'s attention ({', '.join(biased)}) adds a position bias to its scores, "
                "which prefix_attn does not apply; use PEFT for it")
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
