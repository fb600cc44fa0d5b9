"""Trainable prefixes back from a checkpoint of the whole model: transformers' Trainer (a
``checkpoint-N`` folder), ``model.save_pretrained`` or a state dict. Their tensors are there,
under ``prefix_bank.trainable.<name>.*`` (``from_pretrained`` reports them as unexpected),
and their lengths and projection sizes follow from the tensors' shapes."""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Union

import torch
from torch import nn

from . import bank_file, model_info, peft_format
from .bank import PrefixBank
from .tuning import PrefixParameters, add_prefixes

# a prefix's tensors, under any wrapper of the model ("model.", "base_model.model."), and inside
# PEFT's modules_to_save wrapper of a LoRA run ("modules_to_save.<adapter>."; its
# "original_module." copy, the prefix as it was before the run, is not read)
_KEY = re.compile(r"^(|.*\.)prefix_bank\.trainable\.([^.]+)\.(?:modules_to_save\.([^.]+)\.)?"
                  r"(embedding\.weight|transform\.[02]\.(?:weight|bias))$")
_PROJECTION = ("transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
          "pytorch_model.bin")


def load_prefixes(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                  trainable: bool = True) -> list[str]:
    """Add to ``model``'s prefix bank every trainable prefix saved in ``checkpoint``, each under
    its own name; returns the names.

    ``checkpoint``: a folder holding ``model.safetensors`` (or its sharded index, or
    ``pytorch_model.bin``), as a Trainer checkpoint or ``save_pretrained`` writes it, such a
    weights file, or a state dict. Only the prefixes' tensors are read. ``trainable=True``:
    trainable prefixes, as :func:`~prefix_attn.prefix_tuning` makes them (the base frozen; a
    Trainer run goes on from them); ``False``: fixed K/V entries, for serving. Call it once the
    model's weights are loaded. Everything is checked before the model changes: a ValueError
    names what does not fit (no prefix in the checkpoint, shapes of another model, a name the
    bank already has, a model on ``meta``). The base is frozen, a head trained beside the
    prefixes too: make it trainable again before resuming a Trainer run (a warning says so when
    the checkpoint's ``optimizer.pt`` trained more tensors than the model then does)."""
    tensors, where = _prefix_tensors(checkpoint)
    L, Hkv, D = model_info.model_dims(model)
    groups: dict = {}
    for key, t in tensors.items():
        owner, mkey, adapter, part = _KEY.match(key).groups()
        groups.setdefault(PrefixBank._name_of_key(mkey), {}).setdefault((owner, adapter), {})[part] = t
    if not groups:
        why = (f"it holds {_PEFT_PREFIX}" if _holds_peft_prefix(checkpoint)
               else _SAVED_BANK if _is_bank_file(checkpoint)
               else "was it saved from a model after prefix_tuning?")
        raise ValueError(f"{where} holds no trainable prefix (no prefix_bank.trainable.* "
                         f"tensors): {why}")
    for name, copies in groups.items():
        if len(copies) > 1:
            raise ValueError(
                f"{where} holds several prefixes named {name!r}: "
                + ", ".join(f"under {owner or '(the model)'!r}" + (f", adapter {a!r}" if a else "")
                            for owner, a in copies)
                + ": pass a state dict holding one of them")
    modules = {name: _module(name, next(iter(copies.values())), (L, Hkv, D), where)
               for name, copies in groups.items()}
    bank = getattr(model, "prefix_bank", None)
    device = bank.device if isinstance(bank, PrefixBank) else model_info.model_dtype_device(model)[1]
    if device.type == "meta":
        raise ValueError("load_prefixes: the model's weights are on meta (not loaded yet): the "
                         "prefixes read would be dropped; call it after the model's weights load")
    taken = [name for name in modules if isinstance(bank, PrefixBank) and name in bank]
    if taken:
        fixed = [name for name in taken if not bank.is_trainable(name)]
        raise ValueError(
            f"the bank already has prefixes named {taken}: remove them first "
            f"(model.prefix_bank.remove(name))"
            + ("" if fixed else ", or load the checkpoint's weights into them with "
               "model.load_state_dict(..., strict=False)"))
    bank = PrefixBank.attach(model)
    for module in modules.values():
        module.to(bank.device)
    add_prefixes(model, bank, modules, trainable)
    if trainable and isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
        _warn_if_the_optimizer_trained_more(model, os.fspath(checkpoint))
    return list(modules)


def _warn_if_the_optimizer_trained_more(model: nn.Module, folder: str) -> None:
    """A Trainer checkpoint's ``optimizer.pt`` holds the state of every tensor that trained: more
    than the model now trains (a head trained beside the prefix, frozen again with the base
    here) and ``resume_from_checkpoint`` fails on the mismatch. Say so while it can be fixed."""
    path = os.path.join(folder, "optimizer.pt")
    if not os.path.isfile(path):
        return
    try:  # memory-mapped: only the small param_groups list is read (torch's legacy, non-zip
        # format cannot be mapped: read whole)
        groups = torch.load(path, map_location="cpu", weights_only=True,
                            mmap=zipfile.is_zipfile(path))["param_groups"]
        saved = sum(len(g["params"]) for g in groups)
    except Exception:  # noqa: BLE001 -- another optimizer's format (DeepSpeed, FSDP): not judged
        return
    now = sum(1 for p in model.parameters() if p.requires_grad)
    if saved > now:
        warnings.warn(
            f"{path} trained {saved} tensors, the model after load_prefixes trains {now} (its "
            f"prefixes; the rest is frozen): was a module (a classification head) trained beside "
            f"them? make it trainable again, e.g. model.classifier.requires_grad_(True), before "
            f"resuming from this checkpoint, or the optimizer's state will not fit", stacklevel=3)


def _module(name: str, parts: dict, dims: tuple, where: str) -> PrefixParameters:
    """The :class:`PrefixParameters` of one saved prefix, its sizes read from its tensors."""
    L, Hkv, D = dims
    token_dim, out_dim = Hkv * D, L * 2 * Hkv * D
    projection = [k for k in _PROJECTION if k in parts]
    embedding = parts.get("embedding.weight")
    if embedding is None or projection and len(projection) != len(_PROJECTION) \
            or embedding.dim() != 2 or embedding.shape[0] == 0:
        raise ValueError(f"{where}: prefix {name!r} has the tensors {sorted(parts)}: not a "
                         "prefix of prefix_tuning (embedding.weight [P >= 1, width], and "
                         "transform.0 / transform.2 weights and biases for a projection)")
    hidden = parts["transform.0.weight"].shape[0] if projection else None
    module = PrefixParameters(L, Hkv, D, embedding.shape[0], hidden, device="meta")
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in parts.items()}
    if got != want:
        raise ValueError(
            f"{where}: prefix {name!r} does not fit this model (L={L}, Hkv={Hkv}, D={D}: a "
            f"prefix row of {token_dim if projection else out_dim} values): its tensors have "
            f"the shapes {got}")
    with torch.inference_mode(False):  # parameters, not inference tensors
        module = PrefixParameters(L, Hkv, D, embedding.shape[0], hidden)
        module.load_state_dict(parts)
    return module


def _prefix_tensors(checkpoint) -> tuple[dict, str]:
    """(the prefixes' tensors by key, the checkpoint's name for messages)."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if _KEY.match(k)}, "the state dict"
    folder = os.fspath(checkpoint)
    if os.path.isfile(folder) and folder.endswith((".safetensors", ".bin", ".pt", ".pth")):
        return _read(folder, None), folder  # a weights file
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no checkpoint folder {folder!r}")
    name = next((f for f in _FILES if os.path.isfile(os.path.join(folder, f))), None)
    if name is None:
        hint = ""
        adapter = next((f for f in _ADAPTER_FILES if os.path.isfile(os.path.join(folder, f))), None)
        if os.path.isfile(os.path.join(folder, bank_file.BANK_FILE)):
            hint = f"; it holds {_SAVED_BANK}"
        elif adapter is not None and _peft_type(folder) == "PREFIX_TUNING":
            hint = f"; it holds {_PEFT_PREFIX}"
        elif adapter is not None:
            read = ("safetensors.torch.load_file(folder + '/adapter_model.safetensors')"
                    if adapter.endswith(".safetensors") else
                    "torch.load(folder + '/adapter_model.bin', weights_only=True)")
            hint = ("; it holds a PEFT adapter: load it with peft.PeftModel.from_pretrained(model, "
                    "folder) (a prefix in its modules_to_save comes with it), or pass its tensors: "
                    f"load_prefixes(model, {read})")
        raise FileNotFoundError(f"{folder!r} holds none of {', '.join(_FILES)}{hint}")
    path = os.path.join(folder, name)
    if name.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f).get("weight_map", {})
        files: dict = {}
        for key, file in weight_map.items():
            if _KEY.match(key):
                files.setdefault(os.path.join(folder, file), []).append(key)
    else:
        files = {path: None}
    tensors = {}
    for file, keys in files.items():
        tensors.update(_read(file, keys))
    return tensors, path


_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# what a PEFT prefix-tuning adapter is read with (its prompt_embeddings are no trained module)
_PEFT_PREFIX = ("a PEFT prefix-tuning adapter: read it with model.prefix_bank.load_peft(name, "
                "folder) after PrefixBank.attach(model) (trainable=True to train it further), or "
                "use prefix_attn.from_peft on the PeftModel")


def _peft_type(folder: str):
    """The ``peft_type`` of the adapter in ``folder`` (None when unreadable)."""
    try:
        return peft_format._read_config(folder).get("peft_type")
    except (OSError, ValueError):  # FileNotFoundError, AdapterError
        return None


_SAVED_BANK = ("a saved prefix bank (bank.save): load it with "
               "prefix_attn.PrefixBank.load(folder, model)")


def _is_bank_file(checkpoint) -> bool:
    return not isinstance(checkpoint, Mapping) and \
        os.path.basename(os.fspath(checkpoint)) == bank_file.BANK_FILE


def _holds_peft_prefix(checkpoint) -> bool:
    """Whether ``checkpoint`` (a state dict, or a weights file) holds the tensor of a PEFT
    prefix-tuning adapter's file."""
    if isinstance(checkpoint, Mapping):
        return peft_format.TENSOR_KEY in checkpoint
    path = os.fspath(checkpoint)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return peft_format.TENSOR_KEY in f.keys()
    return False


def _read(file: str, keys) -> dict:
    """The prefix tensors of one weights file (``keys``: those to read, None: any that match)."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys or f.keys()) if _KEY.match(k)}
    # mapped, not read whole (only a zip file, torch.save's format since 1.6, can be)
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    return {k: v for k, v in state.items() if _KEY.match(k) and (keys is None or k in keys)}
