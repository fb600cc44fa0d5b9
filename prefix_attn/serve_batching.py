"""How ``prefix-attn generate`` groups its requests into ``model.generate`` calls: by prompt
length, so that a batch holds little padding."""
from __future__ import annotations

from typing import List, Sequence


def by_length(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """The indices of ``lengths`` (each request's prompt tokens), longest first and in file
    order among equal lengths, cut into batches of ``batch_size``. Rows of one batch differ
    little in length, so left padding wastes little. Longest first: the batch most likely to run
    out of memory runs first, before the others' time is spent."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
