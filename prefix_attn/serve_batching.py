"""How ``prefix-attn generate`` groups its requests into ``model.generate`` calls: by decoding
settings (a call decodes all its rows alike), then by prompt length, so that a batch holds little
padding, and in halves when a batch runs out of memory."""
from __future__ import annotations

import gc
from typing import Callable, Dict, Hashable, List, Sequence

import torch

# torch.OutOfMemoryError since torch 2.5; torch.cuda's (the same class since) before it
OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def by_length(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """The indices of ``lengths`` (each request's prompt tokens), longest first and in file
    order among equal lengths, cut into batches of ``batch_size``. Rows of one batch differ
    little in length, so left padding wastes little. Longest first: the batch most likely to run
    out of memory runs first, before the others' time is spent."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def by_setting(lengths: Sequence[int], settings: Sequence[Hashable], batch_size: int) -> List[List[int]]:
    """The indices of ``lengths`` cut into batches of requests with equal ``settings`` (each
    request's decoding), each group's batches as :func:`by_length` cuts them; the batches of every
    group together, longest prompt first (among equals, the group first seen in the file first).
    One group: :func:`by_length`'s batches."""
    groups: Dict[Hashable, List[int]] = {}
    for i, setting in enumerate(settings):
        groups.setdefault(setting, []).append(i)
    batches = [[members[j] for j in batch] for members in groups.values()
               for batch in by_length([lengths[i] for i in members], batch_size)]
    return sorted(batches, key=lambda batch: -lengths[batch[0]])  # stable; batch[0]: its longest


def in_halves_on_oom(run: Callable[[List[int]], None], batch: List[int], device: torch.device,
                     say: Callable[[str], None]) -> None:
    """``run(batch)``; if it runs out of device memory (``torch.OutOfMemoryError``), the
    memory is freed and ``run`` goes on each half of the batch instead, halved again as needed
    (``say`` tells each split). Only a single request that runs out of memory raises. ``run``
    must keep nothing from a call that fails."""
    try:
        return run(batch)
    except OutOfMemoryError:
        if len(batch) == 1:
            raise
    # here, out of the handler, the traceback holding the failed call's tensors is gone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (len(batch) + 1) // 2
    sizes = f"{half}" if 2 * half == len(batch) else f"{half} and {len(batch) - half}"
    say(f"batch of {len(batch)} ran out of memory: retrying as 2 batches of {sizes}")
    for part in (batch[:half], batch[half:]):
        in_halves_on_oom(run, part, device, say)
