"""The prefixes of one batch as the attention kernels take them (built by
:meth:`prefix_attn.bank.PrefixBank.select`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class PrefixSelection:
    """The prefixes of one batch, in the layout the attention kernels take.

    Attributes:
        prefix_ids: LongTensor ``[B]``, index of each row's entry in this selection (``0..n-1``);
            rows without prefix point at an entry of length 0.
        prefix_lens: LongTensor ``[n]``, the length of each selected entry.
        row_lens: LongTensor ``[B]``, the prefix length of each row (tokens after it start there).
        host_row_lens: the same as a list of ints (None if unknown): what the HF hooks decide
            on without reading the device.
        names: list of n bank names (``None`` for the empty "no prefix" entry).
        version: the bank version this selection was built from.
    """

    def __init__(self, kv: Tensor, prefix_ids: Tensor, prefix_lens: Tensor, names: list, version: int,
                 host_row_lens: Optional[list] = None, is_view: bool = False):
        # kv: [L, 2, n, Hkv, Pmax, D]
        self._kv = kv
        self._is_view = is_view
        self.prefix_ids = prefix_ids
        self.prefix_lens = prefix_lens
        self.row_lens = prefix_lens[prefix_ids]
        self.host_row_lens = host_row_lens
        self.names = names
        self.version = version
        self._layer_views = None  # (the _kv they view, [(prefix_k, prefix_v)] per layer)

    @property
    def num_layers(self) -> int:
        return self._kv.shape[0]

    @property
    def max_len(self) -> int:
        """Pmax, the padded length of the selected entries."""
        return self._kv.shape[4]

    @property
    def nbytes(self) -> int:
        """Bytes of the prefix tensor this selection reads (a bank entry itself when ``is_view``)."""
        return self._kv.numel() * self._kv.element_size()

    @property
    def is_view(self) -> bool:
        """True when the selection reads one bank entry in place (no copy was made: the
        entry's tensor, or a trainable entry's parameters without a projection)."""
        return self._is_view

    def layer(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """``(prefix_k, prefix_v)`` for one layer, each ``[n, Hkv, Pmax, D]`` (views, no copy)."""
        kv = self._kv
        if not 0 <= layer_idx < kv.shape[0]:
            raise IndexError(f"layer_idx {layer_idx} out of range for {kv.shape[0]} layers")
        if kv.requires_grad or torch.compiler.is_compiling():
            # views taken now keep this call's grad mode; a graph traces its own
            return tuple(kv[layer_idx].unbind(0))
        # every layer of every forward that reuses this selection (decode steps) reads the
        # same views: made once, for as long as _kv is the same tensor
        cached = self._layer_views
        if cached is None or cached[0] is not kv:
            cached = self._layer_views = (kv, [tuple(t.unbind(0)) for t in kv.unbind(0)])
        return cached[1][layer_idx]

    def __repr__(self) -> str:
        return (
            f"PrefixSelection(names={self.names}, prefix_lens={self.prefix_lens.tolist()}, "
            f"rows={self.prefix_ids.numel()}, max_len={self.max_len})"
        )
