"""What the bank and the HF layer need to know of torch.distributed: is this a multi-process
run, is a module sharded by FSDP2 (``fully_shard``), does a model checkpoint reentrantly.

Every function answers False / 1 where torch.distributed is missing or not initialised, so the
single-process path pays one cheap call."""
from __future__ import annotations

import torch
from torch import nn


def world_size() -> int:
    """Processes in the default group (1 outside torch.distributed)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _fsdp_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2, or without distributed
        return None
    return FSDPModule


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    cls = _fsdp_class()
    return cls is not None and isinstance(module, cls)


def uses_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules went through ``fully_shard``."""
    cls = _fsdp_class()
    return cls is not None and any(isinstance(m, cls) for m in module.modules())


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds sharded parameters now (DTensors between FSDP's gathers) or is
    an FSDP unit of its own (calling it outside the model's forward would start a collective
    that the other ranks never join)."""
    return uses_fsdp(module) or any(is_dtensor(p) for p in module.parameters())


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on in ``model`` with
    ``use_reentrant=True`` (torch's checkpoint takes an absent keyword as True; a checkpoint
    function that is not a ``functools.partial`` is not judged)."""
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(m, "gradient_checkpointing", False):
            keywords = getattr(fn, "keywords", None)
            return keywords is not None and keywords.get("use_reentrant") is not False
    return False
