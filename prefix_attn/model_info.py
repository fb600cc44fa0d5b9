"""What the prefix bank reads from the model it is attached to: its dims, dtype and device,
a signature of its weights (a prompt entry's KV fits only the model that computed it), its
sliding window, and a prompt's KV out of the cache of a prefill."""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import distributed


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(L, Hkv, D) from an HF config (Llama-style names or GPT-2's n_layer / n_head / n_embd)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot attach a PrefixBank: {type(model).__name__} has no .config")
    return config_dims(config)


def config_dims(config) -> tuple[int, int, int]:
    """:func:`model_dims` of a model of ``config`` (its text config's), read before any weight
    is loaded (``prefix-attn generate`` checks adapters and banks against them first)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names):
        for n in names:
            value = config_value(config, n)
            if value is not None:
                return int(value)
        return None

    L = first("num_hidden_layers", "n_layer", "num_layers")
    Hq = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    if L is None or Hq is None:
        raise ValueError(f"cannot infer the layer count / head count from {type(config).__name__}")
    Hkv = first("num_key_value_heads") or Hq
    D = first("head_dim")
    if D is None:
        if hidden is None:
            raise ValueError(f"cannot infer head_dim from {type(config).__name__}")
        D = hidden // Hq
    return L, Hkv, D


def config_value(config, name: str):
    """``config.<name>`` or None; on a heterogeneous config (Gemma 4: per-layer head dims),
    whose global value of a per-layer attribute raises, the layers' common value, and a
    ValueError naming the attribute when the layers differ (the bank has one shape for all)."""
    try:
        return getattr(config, name, None)
    except AttributeError:
        return None
    except Exception:  # noqa: BLE001 -- transformers' AmbiguousGlobalPerLayerAttributeError
        layers = getattr(config, "per_layer_config", None)
        values = [getattr(layers[i], name, None) for i in range(len(layers))] if layers else []
        if len(set(values)) == 1:
            return values[0]
        raise ValueError(f"{type(config).__name__}'s layers have different {name} "
                         f"({', '.join(map(str, values))}): the prefix bank holds one shape for "
                         "every layer") from None


# the dtypes a bank holds (the kernels' fp16 / bf16 / fp32, and fp64 for the reference): a
# float8 or packed-int weight of a quantized model is no dtype for the prefixes
BANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def plain_weight(t: Tensor) -> bool:
    """Whether ``t`` holds its values as they are: a plain tensor or parameter (or an FSDP
    shard of one) of a bank dtype. A quantized weight is not: bitsandbytes' packed 4-bit
    storage (uint8, or bf16 words of packed bits), torchao's and quanto's tensor subclasses."""
    if t.dtype not in BANK_DTYPES:
        return False
    return type(t) in (nn.Parameter, Tensor) or distributed.is_dtensor(t)


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first plain floating weight (:func:`plain_weight`:
    the embeddings of a quantized model) that holds data. Weights on
    ``meta`` are offloaded (accelerate's disk / CPU offload, ``device_map`` with "disk") or not
    loaded yet (``init_empty_weights``): skipped; when all are, the device the model runs on
    (accelerate's hook) or, without one, ``meta`` (the bank follows the load's ``.to()``)."""
    weights = [t for t in itertools.chain(model.parameters(), model.buffers()) if plain_weight(t)]
    if not weights:
        return torch.get_default_dtype(), torch.device("cpu")
    loaded = [t for t in weights if t.device.type != "meta"]
    if len(loaded) == len(weights):
        return weights[0].dtype, weights[0].device
    # the dtype of the first parameter, on meta or not (buffers such as RoPE's inv_freq stay
    # float32 in a bf16 model)
    dtype = next((p.dtype for p in model.parameters() if plain_weight(p)), weights[0].dtype)
    runs_on = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if runs_on is not None:
        return dtype, torch.device(runs_on)
    return dtype, loaded[0].device if loaded else weights[0].device


_SIGNATURE_SIZE = 64


def model_signature(model: nn.Module) -> list:
    """A few weights of ``model`` (of up to 64 parameter tensors spread over it, the middle
    value of each one's first row: resizing the token embeddings appends rows and moves no
    sample), as floats, None for a weight offloaded to ``meta`` or quantized (not a
    :func:`plain_weight`: packed storage changes when bitsandbytes repacks it for inference,
    and torchao's subclasses cannot be sliced): a prompt entry's KV fits only the model that
    computed it, and this tells two models apart while staying stable under a dtype or device
    move."""
    bank = getattr(model, "prefix_bank", None)
    own = {id(p) for p in bank.parameters()} if isinstance(bank, nn.Module) else set()
    params = [p for p in model.parameters() if p.numel() and id(p) not in own]  # the base only
    step = max(1, len(params) // _SIGNATURE_SIZE)
    with torch.no_grad():
        picks = [_first_row_middle(p) if p.device.type != "meta" and plain_weight(p) else None
                 for p in params[::step][:_SIGNATURE_SIZE]]
        held = [t for t in picks if t is not None]
        try:  # one read-back (not one host sync per weight on a GPU)
            values = iter(torch.cat(held).tolist() if held else [])
        except RuntimeError:  # weights on several devices (device_map)
            values = iter([float(t) for t in held])
        return [None if t is None else next(values) for t in picks]


def _first_row_middle(p: Tensor) -> Tensor:
    """The middle value of ``p``'s first row (a 0-d weight: itself), as a float32 ``[1]``."""
    i = p.shape[-1] // 2 if p.dim() else 0
    return p.reshape(-1)[i:i + 1].float()


def same_signature(a, b) -> bool:
    """Equal up to bfloat16 rounding (a model saved in one dtype and loaded in another), at the
    samples both hold (an offloaded or quantized weight's is None); a NaN or infinite sample
    equals only the same value."""
    return b is not None and len(a) == len(b) and all(
        _close(x, y) for x, y in zip(a, b) if x is not None and y is not None)


def _close(x: float, y: float) -> bool:
    if not (math.isfinite(x) and math.isfinite(y)):
        return x == y or (math.isnan(x) and math.isnan(y))
    return abs(x - y) <= 1e-2 * max(abs(x), abs(y)) + 1e-6


def warn_window_vs_peft(model: Optional[nn.Module], what: str) -> None:
    """Warn that a PEFT adapter on a sliding-window model gives PEFT's logits only while the
    prefix and the text fit in the window (PEFT's prefix sits in the KV cache, where the window
    hides it from later tokens; a prefix here is never windowed, docs/DESIGN.md)."""
    window = sliding_window(model) if model is not None else None
    if window is not None:
        warnings.warn(
            f"{what}: {type(model).__name__} has sliding-window layers ({window} tokens): PEFT's "
            "prefix sits in the KV cache, where the window hides it from tokens further than "
            f"{window} positions; here a prefix is never windowed, so the logits equal PEFT's "
            "only while prefix + text fit in the window", stacklevel=3)


def sliding_window(model: nn.Module) -> Optional[int]:
    """The sliding window of ``model``'s attention layers (some or all), or None."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(cfg, "use_sliding_window", True) is False:  # Qwen2 keeps a window it does not use
        return None
    return int(window) if window else None


def cache_to_kv(cache, num_layers: int, length: int) -> Tensor:
    """``[L, 2, Hkv, P, D]`` from an HF cache of batch 1 (``DynamicCache`` or legacy tuples)
    holding ``length`` positions in every layer."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        pairs = [(k, v) for k, v in cache]
    if len(pairs) != num_layers:
        raise ValueError(f"the model's cache has {len(pairs)} layers, the bank expects {num_layers}")
    kept = sorted({k.shape[-2] for k, _ in pairs})
    if kept != [length]:
        raise ValueError(
            f"the model's cache holds {kept} positions for a {length}-token prompt (a "
            "sliding-window cache keeps only the last window); prompt prefixes need the full KV")
    return torch.stack([torch.stack([k[0], v[0]], dim=0) for k, v in pairs], dim=0)
