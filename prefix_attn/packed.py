"""Packed sequences (several sequences in one batch row, padding-free training) on the kernel.

transformers finds packed sequences from ``position_ids`` that restart inside a row (e.g.
``DataCollatorWithFlattening``) and masks attention block-diagonally. The kernel's contract
has one sequence per row, so :func:`packed_attention` regroups the tokens: each sequence
becomes a row of a right-padded batch ``[n_sequences, H, L_max, D]`` (a gather of q, k, v),
every sequence sees its row's prefix, and the outputs are gathered back into the packed
order. Exact, differentiable (gathers), and without the ``T x T`` dense mask and the
PyTorch fallback that a block-diagonal mask would otherwise need.

``seq_ids`` ``[B, T]``: the sequence index of every token within its row (transformers'
``packed_sequence_mask``: 0, 0, 1, 1, 1, 2, ...), non-decreasing along the row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import validation


def sequence_ids(position_ids: Tensor) -> Tensor:
    """``[B, T]`` sequence index of every token within its row: a new sequence starts wherever
    the position does not go up by one (transformers' ``find_packed_sequence_indices``)."""
    breaks = (torch.diff(position_ids, dim=-1) != 1).cumsum(-1)
    return torch.cat([torch.zeros_like(breaks[:, :1]), breaks], dim=-1)


# seq_ids tensor -> (its stamp, segments): every layer of a forward gets the same seq_ids, and
# finding the segments costs host syncs (unique_consecutive, L_max, the output positions)
_SEGMENTS = WeakIdKeyDictionary()


def segments(seq_ids: Tensor):
    """The sequences of a packed batch: (index ``[n, L_max]`` into the flattened ``B * T``
    tokens, valid ``[n, L_max]`` bool, row ``[n]`` of each sequence, and ``slots``: the
    (sequence, position) of each packed token in the ``[n, L_max]`` layout, two ``[B * T]``
    tensors). Computed once per ``seq_ids`` tensor (not per layer): two host syncs."""
    stamp = (seq_ids.data_ptr(), None if seq_ids.is_inference() else seq_ids._version)
    hit = _SEGMENTS.get(seq_ids)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    found = _segments(seq_ids)
    _SEGMENTS[seq_ids] = (stamp, found)
    return found


def _segments(seq_ids: Tensor):
    B, T = seq_ids.shape
    row_base = torch.arange(B, device=seq_ids.device)[:, None] * (T + 1)
    flat = (seq_ids.to(torch.long) + row_base).reshape(-1)  # unique per (row, sequence)
    _, counts = torch.unique_consecutive(flat, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    l_max = int(counts.max()) if counts.numel() else 0
    j = torch.arange(l_max, device=seq_ids.device)
    valid = j[None, :] < counts[:, None]
    index = (starts[:, None] + j[None, :]).clamp(max=max(B * T - 1, 0))
    # the valid slots, in sequence order, are the packed tokens in their original order
    seq, pos = torch.nonzero(valid, as_tuple=True)
    return index, valid, starts // max(T, 1), (seq, pos)


def _regroup(x: Tensor, index: Tensor) -> Tensor:
    """``[B, H, T, D]`` -> ``[n, H, L_max, D]`` (a strided view of one gathered copy)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H, D)[index].transpose(1, 2)


def packed_attention(query, key, value, seq_ids, prefix_k=None, prefix_v=None,
                     prefix_ids: Optional[Tensor] = None, prefix_lens=None,
                     per_sequence: bool = False, segs=None, **kw) -> Tensor:
    """``prefix_attention`` over packed rows: query ``[B, Hq, T, D]``, key/value
    ``[B, Hkv, T, D]`` (no cache: the packed format is a training / full-prefill one),
    ``seq_ids`` ``[B, T]``; ``prefix_ids`` ``[B]``, each sequence taking its row's entry, or with
    ``per_sequence`` ``[n]``, one per sequence in packed order; ``kw``: causal / scale /
    window / softcap, applied within each sequence; ``segs``: :func:`segments` of ``seq_ids``
    if already found. Returns ``[B, T, Hq, D]``."""
    from .api import prefix_attention

    B, Hq, T, D = query.shape
    index, valid, row, slots = segments(seq_ids) if segs is None else segs
    ids = prefix_ids
    if not per_sequence and prefix_ids is not None:
        ids = validation.inherit_range(prefix_ids[row], prefix_ids)  # a gather: same range
    out = prefix_attention(_regroup(query, index), _regroup(key, index), _regroup(value, index),
                           prefix_k, prefix_v, prefix_ids=ids, prefix_lens=prefix_lens,
                           key_padding_mask=valid, **kw)
    seq, pos = slots
    # a gather by index tensors, not a boolean mask: no host sync, in the forward or the
    # backward, and no copy of the whole [n, Hq, L_max, D] output first
    return out[seq, :, pos].reshape(B, T, Hq, D)


def packed_dense_mask(seq_ids: Tensor, causal: bool, window: Optional[int]) -> Tensor:
    """The bool mask ``[B, 1, T, T]`` (True = visible) of packed rows: same sequence, and the
    causal / window rule within it (for the PyTorch fallback path)."""
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    i = torch.arange(T, device=seq_ids.device)
    delta = i[:, None] - i[None, :]  # query - key
    if causal:
        same = same & (delta >= 0)
    if window is not None:
        same = same & (delta < window)
    return same[:, None]
