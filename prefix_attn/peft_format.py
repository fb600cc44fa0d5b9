"""Read and write PEFT prefix-tuning adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT (``peft.tuners.prefix_tuning``) stores one tensor ``prompt_embeddings`` of shape
``[P, L * 2 * Hkv * D]``; ``PeftModel.get_prompt`` reads it as ``view(P, L, 2, Hkv, D)``
(index 0 of the ``2`` axis = key, 1 = value). This module converts between that layout and
the bank's ``[L, 2, Hkv, P, D]`` entries, and checks every field before anything is returned,
so a bad adapter never reaches the bank.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"  # the model card PEFT's save_pretrained writes beside the adapter
WEIGHTS_NAME_BIN = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False)
TENSOR_KEY = "prompt_embeddings"
# a whole model's weights (save_pretrained of the model, a Trainer checkpoint)
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class AdapterError(ValueError):
    """A PEFT adapter folder that cannot be used with this bank (names the file and the mismatch)."""


@dataclass(frozen=True)
class BankShape:
    """The per-layer KV shape a bank expects: ``num_layers`` L, ``num_kv_heads`` Hkv, ``head_dim`` D."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def bank_file_hint(directory: str) -> str:
    """For a folder given as a saved prefix bank that has no bank file: a hint when it holds a
    PEFT adapter instead ("" otherwise)."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return ("; this folder holds a PEFT adapter: load it as one (--adapter NAME=DIR, "
                "bank.load_peft(name, dir))")
    return ""


def _read_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"PEFT adapter folder not found: {adapter_dir!r}")
    if not os.path.isfile(path):
        inner = sorted(d for d in os.listdir(adapter_dir)
                       if os.path.isfile(os.path.join(adapter_dir, d, CONFIG_NAME)))
        hint = (f"; it holds adapters in subfolders ({', '.join(inner)}, as PEFT saves several "
                f"adapters): load each from its own, e.g. {os.path.join(adapter_dir, inner[0])!r}"
                if inner else "")
        if os.path.isfile(os.path.join(adapter_dir, "prefix_bank.safetensors")):
            hint = ("; this folder holds a saved prefix bank: load it as one (--bank DIR, "
                    "PrefixBank.load(dir, model))")
        elif any(os.path.isfile(os.path.join(adapter_dir, f)) for f in _MODEL_FILES):
            hint = ("; this folder holds a whole model (model.save_pretrained or a Trainer "
                    "checkpoint, not PEFT's adapter-only save_pretrained): take its prefixes "
                    "with prefix_attn.load_prefixes(model, dir); model.prefix_bank.save_peft(name, "
                    "dir) writes a PEFT adapter")
        raise FileNotFoundError(f"PEFT adapter config missing: {path!r}{hint}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable JSON adapter config ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_tensor(adapter_dir: str) -> tuple[str, torch.Tensor]:
    st_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    bin_path = os.path.join(adapter_dir, WEIGHTS_NAME_BIN)
    if os.path.isfile(st_path):
        path = st_path
        try:
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise AdapterError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
    elif os.path.isfile(bin_path):
        path = bin_path
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{path}: corrupt or unreadable torch file ({exc})") from exc
        if not isinstance(tensors, dict):
            raise AdapterError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    else:
        raise FileNotFoundError(f"PEFT adapter weights missing: neither {st_path!r} nor {bin_path!r} exists")
    if TENSOR_KEY not in tensors:
        raise AdapterError(f"{path}: no tensor {TENSOR_KEY!r} (found {sorted(tensors)})")
    others = sorted(k for k in tensors if k != TENSOR_KEY)
    if others:  # PEFT's modules_to_save (a trained classification head, say): not a prefix
        warnings.warn(
            f"{path} holds tensors besides the prefix, which are not loaded: {others[:8]}"
            f"{' ...' if len(others) > 8 else ''} (PEFT's modules_to_save, e.g. a trained "
            "head; their keys are relative to the PeftModel: load them into the model yourself, "
            "or use prefix_attn.from_peft on the PeftModel, which keeps them)", stacklevel=4)
    return path, tensors[TENSOR_KEY]


def _int_field(config: dict, key: str, cfg_path: str, default=None):
    """``config[key]`` as an int (None or absent: ``default``); anything but an integer (a
    string, a float, a list, a bool) is an AdapterError naming the file and the field."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{cfg_path}: field {key!r} must be an integer, got {value!r}")
    return value


def _saved_heads(config: dict, cfg_path: str, shape: BankShape, query_heads: Optional[int]) -> int:
    """The heads per layer the adapter holds: ``shape.num_kv_heads``, or every query head of a
    multi-query model whose adapter a PEFT before transformers knew its kv heads saved so
    (GPT-BigCode: such an adapter served head 0 only, which is what the bank takes)."""
    H, D = shape.num_kv_heads, shape.head_dim
    if (H == 1 and query_heads is not None and query_heads > 1
            and _int_field(config, "num_attention_heads", cfg_path) == query_heads
            and _int_field(config, "token_dim", cfg_path) == query_heads * D):
        warnings.warn(
            f"{cfg_path}: saved with all {query_heads} query heads of this multi-query model "
            "(by a PEFT under a transformers whose config had no num_key_value_heads); its PEFT "
            "used head 0 of each layer only, and so does the bank (later PEFT releases cannot "
            "load this adapter)", stacklevel=4)
        return query_heads
    return H


def check_peft_adapter(adapter_dir: str, shape: BankShape, query_heads: Optional[int] = None) -> None:
    """:func:`read_peft_adapter`'s checks that need no tensor data: its config against ``shape``,
    a weights file present and, in a safetensors file, the prefix tensor's shape and dtype (read
    from the header). The same errors; cheap enough to run before a large model loads."""
    config, heads, P = _checked_config(adapter_dir, shape, query_heads)
    st_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(st_path):
        if not os.path.isfile(os.path.join(adapter_dir, WEIGHTS_NAME_BIN)):
            _read_tensor(adapter_dir)  # raises the missing-file error
        return  # a torch file has no header to read without loading it
    try:
        from safetensors import safe_open

        with safe_open(st_path, framework="pt", device="cpu") as f:
            if TENSOR_KEY not in f.keys():
                raise AdapterError(f"{st_path}: no tensor {TENSOR_KEY!r} (found {sorted(f.keys())})")
            head = f.get_slice(TENSOR_KEY)
            dims, dtype = head.get_shape(), head.get_dtype()
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"{st_path}: corrupt or unreadable safetensors file ({exc})") from exc
    _check_embedding(st_path, list(dims), None if dtype.startswith(("F", "BF")) else dtype, P, heads, shape)


def query_heads_of(config) -> Optional[int]:
    """The ``query_heads`` argument of :func:`read_peft_adapter` for a model of ``config``: its
    query heads on a multi-query GPT-BigCode (whose older PEFT saved every query head and served
    head 0), None elsewhere. The text config's, as the bank's dims (model_info.model_dims)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "model_type", None) != "gpt_bigcode":
        return None
    return getattr(config, "num_attention_heads", None)


def _checked_config(adapter_dir: str, shape: BankShape, query_heads: Optional[int]) -> tuple[dict, int, int]:
    """The adapter's config checked against ``shape``: (config, heads it holds, P)."""
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    config = _read_config(adapter_dir)
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}, expected 'PREFIX_TUNING'")
    if _int_field(config, "num_transformer_submodules", cfg_path, 1) != 1:
        raise AdapterError(
            f"{cfg_path}: num_transformer_submodules={config.get('num_transformer_submodules')} "
            "(encoder-decoder adapter); only decoder-only models (1) are supported"
        )
    heads = _saved_heads(config, cfg_path, shape, query_heads)
    # PEFT's num_attention_heads counts the key/value heads (num_key_value_heads under GQA)
    expected = {
        "num_layers": (shape.num_layers, f"{shape.num_layers} layers"),
        "num_attention_heads": (heads, f"{heads} key/value heads"),
        "token_dim": (heads * shape.head_dim, f"{heads} key/value heads x head dim {shape.head_dim}"),
    }
    for key, (want, what) in expected.items():
        got = _int_field(config, key, cfg_path)
        if got is None:
            raise AdapterError(f"{cfg_path}: field {key!r} missing (this model needs {want})")
        if got != want:
            raise AdapterError(
                f"{cfg_path}: {key}={got} but this model needs {key}={want} ({what}; "
                f"L={shape.num_layers}, Hkv={shape.num_kv_heads}, D={shape.head_dim}); "
                "is it a prefix-tuning adapter for another model?"
            )
    P = _int_field(config, "num_virtual_tokens", cfg_path)
    if P is None or P < 0:
        raise AdapterError(f"{cfg_path}: num_virtual_tokens missing or negative ({P!r})")
    return config, heads, P


def _check_embedding(path: str, dims: list, not_float, P: int, heads: int, shape: BankShape) -> None:
    """The prefix tensor of ``path`` (its ``dims``; ``not_float``: None for a floating dtype,
    else the dtype to name) is ``[P, L*2*Hkv*D]`` of floats."""
    width = shape.num_layers * 2 * heads * shape.head_dim
    if len(dims) != 2 or tuple(dims) != (P, width):
        raise AdapterError(
            f"{path}: {TENSOR_KEY} has shape {dims}, expected [P={P}, L*2*Hkv*D={width}] "
            f"(L={shape.num_layers}, Hkv={heads}, D={shape.head_dim})"
        )
    if not_float is not None:
        raise AdapterError(f"{path}: {TENSOR_KEY} has dtype {not_float}, expected a floating-point tensor")


def read_peft_adapter(adapter_dir: str, shape: BankShape,
                      query_heads: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """Load a PEFT prefix-tuning adapter and check it against ``shape``. ``query_heads``: the
    model's query heads where an adapter with one set of keys per query head is read as PEFT
    served it (multi-query GPT-BigCode, :func:`_saved_heads`).

    Returns ``(kv, config)`` with ``kv`` of shape ``[L, 2, Hkv, P, D]`` (CPU, the file's dtype)
    and the parsed ``adapter_config.json``. Raises ``FileNotFoundError`` for missing files and
    ``AdapterError`` (a ``ValueError``) naming the file and the field for anything else.
    """
    config, heads, P = _checked_config(adapter_dir, shape, query_heads)
    path, emb = _read_tensor(adapter_dir)
    _check_embedding(path, list(emb.shape), None if emb.is_floating_point() else emb.dtype, P, heads, shape)
    # [P, L*2*Hkv*D] -> [P, L, 2, Hkv, D] (PEFT's view) -> [L, 2, Hkv, P, D] (the bank's layout)
    kv = emb.view(P, shape.num_layers, 2, heads, shape.head_dim).permute(1, 2, 3, 0, 4)
    return kv[:, :, :shape.num_kv_heads].contiguous(), config


# model class name endings whose adapters PEFT loads as CAUSAL_LM (PeftModelForCausalLM)
_CAUSAL_LM = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def task_type_of(model) -> str:
    """PEFT's task type for an adapter of ``model``: CAUSAL_LM for language models (and without
    a model); FEATURE_EXTRACTION (PEFT's generic wrapper) for the others: a bare encoder
    (``BertModel``) has no generation method for CAUSAL_LM's wrapper, and PEFT's SEQ_CLS /
    TOKEN_CLS wrappers expect the task head's weights in the adapter, which holds only the
    prefix (the head is the model's to save)."""
    if model is None or type(model).__name__.endswith(_CAUSAL_LM):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def write_peft_adapter(
    adapter_dir: str,
    kv: torch.Tensor,
    base_model_name_or_path: Optional[str] = None,
    task_type: str = "CAUSAL_LM",
) -> None:
    """Write ``kv`` ``[L, 2, Hkv, P, D]`` as a PEFT prefix-tuning adapter loadable by
    ``peft.PeftModel.from_pretrained`` (inference mode, no projection; ``task_type``: see
    :func:`task_type_of`), with a ``README.md`` model card (:func:`model_card`) unless the
    folder holds one of yours already (kept as it is; the card an earlier save wrote is
    replaced, as it describes that adapter). The files are written as one change
    (``atomic.write_files``): a failure puts back what was there.
    """
    from safetensors.torch import save as st_save

    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [L, 2, Hkv, P, D], got {list(kv.shape)}")
    L, _, Hkv, P, D = kv.shape
    emb = kv.detach().permute(3, 0, 1, 2, 4).reshape(P, L * 2 * Hkv * D).contiguous().cpu()
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": int(P),
        "token_dim": int(Hkv * D),
        "num_transformer_submodules": 1,
        "num_attention_heads": int(Hkv),
        "num_layers": int(L),
        "encoder_hidden_size": int(Hkv * D),
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    if os.path.exists(adapter_dir) and not os.path.isdir(adapter_dir):
        raise NotADirectoryError(f"{adapter_dir!r} is a file; give a folder (a PEFT adapter is "
                                 f"a folder holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    # both files as one change: a failed write (a full disk) leaves an adapter there before
    # as it was (not its config beside the new weights) and makes no folder
    files = {}  # moved in in this order: the config last (readers do not lock)
    if not os.path.exists(os.path.join(adapter_dir, CARD_NAME)) or _card_unedited(adapter_dir):
        files[CARD_NAME] = model_card(config).encode("utf-8")  # a card of the user's is kept
    files[WEIGHTS_NAME] = st_save({TENSOR_KEY: emb}, metadata={"format": "pt"})
    files[CONFIG_NAME] = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    atomic.write_files(adapter_dir, files)


def _card_unedited(adapter_dir: str) -> bool:
    """Whether the folder's ``README.md`` is the card an earlier save wrote, unedited: the one
    :func:`model_card` gives for the config there. It describes that adapter (its virtual
    tokens, base model), so a save of another one replaces it; any other card is the user's."""
    try:
        with open(os.path.join(adapter_dir, CARD_NAME), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(adapter_dir, CONFIG_NAME), encoding="utf-8") as f:
            return text == model_card(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):  # not ours to judge: kept
        return False


def model_card(config: dict) -> str:
    """A ``README.md`` for an adapter folder, as PEFT writes one (its metadata lets the Hugging
    Face Hub list the folder as a PEFT adapter of its base model): ``library_name: peft``,
    ``base_model`` when known, the prefix-tuning tags, and how to load it."""
    from . import __version__

    meta = ["library_name: peft"]
    if config.get("base_model_name_or_path"):
        meta.append(f"base_model: {json.dumps(config['base_model_name_or_path'])}")
    if config.get("task_type") == "CAUSAL_LM":
        meta.append("pipeline_tag: text-generation")
    meta += ["tags:", "- prefix-tuning", "- prefix_attn"]
    shape = (f"{config['num_virtual_tokens']} virtual tokens for each of {config['num_layers']} "
             f"layers ({config['num_attention_heads']} key/value heads of "
             f"{config['token_dim'] // config['num_attention_heads']} dims)")
    return "\n".join([
        "---", *meta, "---", "",
        "# Prefix-tuning adapter", "",
        f"A PEFT prefix-tuning adapter ({config['task_type']}): {shape}, written by prefix_attn "
        f"{__version__}.", "",
        "Load it with PEFT:", "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, ADAPTER_DIR)",
        "```", "",
        "or into a prefix_attn bank (one copy of the prefix, mixed with other prefixes per row):", "",
        "```python",
        "import prefix_attn",
        "bank = prefix_attn.PrefixBank.attach(base_model)",
        'bank.load_peft("my-prefix", ADAPTER_DIR)',
        "```", "",
        "### Framework versions", "",
        f"- prefix_attn {__version__}", "",
    ])
