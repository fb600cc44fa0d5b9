"""How ``prefix-attn generate`` groups its requests into ``model.generate`` calls: by prompt
length, so that a batch holds little padding, and in halves when a batch runs out of memory."""
from __future__ import annotations

import gc
from typing import Callable, List, Sequence

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
