"""How ``prefix-attn generate`` groups its requests into ``model.generate`` calls: by decoding
settings (a call decodes all its rows alike), then by prompt length, so that a batch holds little
padding, and in halves when a batch runs out of memory; after that, no later batch tries more
requests than the first part that then ran (:class:`Fitting`)."""
from __future__ import annotations

import gc
from typing import Callable, Dict, Hashable, List, Optional, Sequence

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


class Fitting:
    """The most requests a batch tries in the rest of a run: none (any size) until a batch runs
    out of memory; then the size of the first batch (or part of one) that runs after it. Batches
    run longest prompt first, so a later one is no longer and fits as well; another running out
    of memory lowers it again. It never rises: a run that once ran out of memory does not try a
    size that may fail again (each failed try costs a whole generate call)."""

    def __init__(self):
        self.size: Optional[int] = None
        self._failed = False  # ran out of memory, no part has run since

    def failed(self) -> None:
        self._failed = True

    def ran(self, size: int) -> None:
        if self._failed:
            self.size, self._failed = size, False


def in_halves_on_oom(run: Callable[[List[int]], None], batch: List[int], device: torch.device,
                     say: Callable[[str], None], fitting: Optional[Fitting] = None) -> None:
    """``run(batch)``; if it runs out of device memory (``torch.OutOfMemoryError``), the
    memory is freed and ``run`` goes on each half of the batch instead, halved again as needed
    (``say`` tells each split). Only a single request that runs out of memory raises. ``run``
    must keep nothing from a call that fails. ``fitting``: kept across the batches of a run, cuts
    a batch larger than its size into parts of it, in order, before trying (default: a new one,
    which cuts nothing)."""
    fitting = Fitting() if fitting is None else fitting
    if fitting.size is not None and len(batch) > fitting.size:
        size = fitting.size
        for start in range(0, len(batch), size):  # each part checked again: the size may drop
            in_halves_on_oom(run, batch[start:start + size], device, say, fitting)
        return
    try:
        run(batch)
        return fitting.ran(len(batch))
    except OutOfMemoryError:
        if len(batch) == 1:
            raise
    fitting.failed()
    # here, out of the handler, the traceback holding the failed call's tensors is gone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (len(batch) + 1) // 2
    sizes = f"{half}" if 2 * half == len(batch) else f"{half} and {len(batch) - half}"
    say(f"batch of {len(batch)} ran out of memory: retrying as 2 batches of {sizes}")
    for part in (batch[:half], batch[half:]):
        in_halves_on_oom(run, part, device, say, fitting)
