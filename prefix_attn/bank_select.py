"""Names -> ids -> selection: the part of :class:`~prefix_attn.bank.PrefixBank` that turns a
batch's prefixes (names, ids, a tensor of ids) into bank ids and a :class:`PrefixSelection`
holding only the entries the batch uses, with the caches that let decode steps reuse one, the
:meth:`pinned` snapshots of a ``generate`` call and the training-time rules (the zero anchor,
entries joined under DDP / FSDP). A mixin: it reads the bank's snapshot ``self._state``, its
lock and its caches, which ``PrefixBank.__init__`` makes."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import operator
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from prefix_attn import api, distributed, validation
from prefix_attn.bank_names import some_names
from prefix_attn.selection import PrefixSelection

if TYPE_CHECKING:
    from prefix_attn.bank import _Entry

CACHE_SIZE = 8  # selections a bank keeps by default (PrefixBank.cache_size)

PrefixSpec = Union[None, str, int, Sequence[Union[None, str, int]], Tensor]

# Optimizer steps taken in this process (any torch.optim.Optimizer, through torch's global
# step hook): part of the cache key of selections with trainable entries, since fused
# optimizers (AdamW(fused=True), HF Trainer's default) update parameters without bumping
# their version counters.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)

# {id(bank): (bank, snapshot, caches)} of the banks pinned in this thread / context
# (PrefixBank.pinned); ``caches`` keeps the selections of the snapshot once the bank has moved on
_PINNED: contextvars.ContextVar = contextvars.ContextVar("prefix_attn_pinned_banks", default=None)


def _as_id(p) -> int:
    """An integer bank id from an int, a numpy integer or a 0-d integer tensor (an id read from
    a request table); TypeError for anything else (bools and floats included)."""
    if isinstance(p, Tensor):
        ok = p.dim() == 0 and not (p.is_floating_point() or p.is_complex() or p.dtype == torch.bool)
    else:
        ok = not isinstance(p, bool) and type(p).__name__ != "bool_" and hasattr(p, "__index__")
    if not ok:
        raise TypeError(f"each prefix must be a name, an int id or None, got {p!r}")
    return operator.index(p) if not isinstance(p, Tensor) else int(p)


def _id_range(n: int) -> str:
    """The bank ids a bank of ``n`` entries takes, for errors."""
    entries = f"ids 0..{n - 1} (a bank of {n} entr{'y' if n == 1 else 'ies'})" if n else \
        "the bank is empty"
    return f"{entries}; -1 or None for no prefix"


def _shares_storage(t: Tensor, held: list) -> bool:
    """Whether ``t`` reads the storage of one of ``held`` (False where a tensor subclass, such
    as FSDP's DTensor, has no plain storage)."""
    try:
        return t.untyped_storage().data_ptr() in {h.untyped_storage().data_ptr() for h in held}
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _version_of(t: Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


def _anchored(sel: PrefixSelection, anchor: Tensor) -> PrefixSelection:
    """A copy of ``sel`` carrying ``anchor``, which the attention function adds to its output
    (a zero: the same values, in the autograd graph through ``anchor`` alone, whatever path
    the layer takes and however long the prefix, 0 included)."""
    out = copy.copy(sel)
    out._anchor = anchor
    return out


def _output_follows_parameters(module: nn.Module) -> bool:
    """Whether a trainable entry's output may be taken for a function of its parameters (a
    selection made without autograd is then cached, keyed on them). Not so with a PEFT adapter
    layer inside (LoRA's target_modules="all-linear" wraps the prefix MLP: set_adapter and
    disable_adapter change the output and no parameter), forward hooks, or accelerate's."""
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") \
                or hasattr(m, "adapter_layer_names"):
            return False
    return True


def _trains(entry: _Entry) -> bool:
    """Whether ``entry`` is a trainable entry with a parameter that requires grad."""
    return entry.module is not None and any(p.requires_grad for p in entry.module.parameters())


class _PinCaches:
    """The selection and id caches of one pinned call (``PrefixBank.pinned``), used once the
    bank has moved past its snapshot; they live as long as the call."""

    def __init__(self):
        self.selections: OrderedDict = OrderedDict()
        self.ids: OrderedDict = OrderedDict()


class Selecting:
    """The selection methods of :class:`~prefix_attn.bank.PrefixBank` (see the module docstring)."""

    # -- which prefix a call takes, which entries train --------------------------------------
    def _default_in_call(self) -> Optional[str]:
        """:attr:`default_prefix` as a :meth:`pinned` block found it (else as it is now)."""
        if not self.__dict__.get("_had_default"):
            return None
        pins = _PINNED.get()
        pin = pins.get(id(self)) if pins else None
        return pin[3] if pin is not None and pin[0] is self else self.__dict__.get("_default_prefix")

    def _trained_names(self) -> list[str]:
        """Names of the trainable entries with a parameter that requires grad."""
        entries = self._state[1]
        names = entries.names_index()[0]
        return [names[i] for i in entries.module_ids() if _trains(entries[names[i]])]

    def _trains_any(self) -> bool:
        """Whether a trainable entry has a parameter that requires grad (stops at the first)."""
        entries = self._state[1]
        names = entries.names_index()[0]
        return any(_trains(entries[names[i]]) for i in entries.module_ids())

    # -- names -> ids -> selection -----------------------------------------------------
    def ids(self, prefixes: PrefixSpec, batch_size: Optional[int] = None,
            device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """LongTensor ``[B]`` of bank ids (-1 = no prefix) on ``device`` (default: the bank's).

        ``prefixes``: a list of names / ints / None per row, a LongTensor ``[B]`` of ids, or a single
        name / id / None applied to every row (then ``batch_size`` is required; a 1-element list
        is broadcast the same way)."""
        return torch.tensor(self._row_ids(prefixes, batch_size, self._snapshot()[1]), dtype=torch.long,
                            device=self.device if device is None else device)

    @contextlib.contextmanager
    def pinned(self):
        """Within the block, :meth:`ids` and :meth:`select` in this thread read the bank as it
        is on entry: entries added, replaced or removed meanwhile (by other threads: another
        tenant) do not change ids or contents for this block. ``generate(prefixes=...)`` runs
        in one, so a request keeps its prefixes from the first step to the last. Nested blocks
        keep the outermost snapshot. The :attr:`default_prefix` is kept with it."""
        pins = _PINNED.get() or {}
        if id(self) in pins and pins[id(self)][0] is self:
            yield
            return
        with self._lock:  # the snapshot and the default prefix of the same moment
            pin = (self, self._state, _PinCaches(), self.__dict__.get("_default_prefix"))
        token = _PINNED.set({**pins, id(self): pin})
        try:
            yield
        finally:
            _PINNED.reset(token)

    def _caches_for(self, version: int) -> list:
        """``[(selections, ids)]`` caches for selections of ``version``, in lookup order: a
        pinned call's own (kept for the call: once other tenants change the bank, its decode
        steps would otherwise rebuild the stacked copy at every step), then the bank's while
        ``version`` is current. A selection made is stored in all of them."""
        caches = []
        pins = _PINNED.get()
        pin = pins.get(id(self)) if pins else None
        if pin is not None and pin[0] is self and pin[1][0] == version:
            caches.append((pin[2].selections, pin[2].ids))
        if self._state[0] == version:
            caches.append((self._cache, self._ids_cache))
        return caches

    def _snapshot(self) -> tuple:
        """``(version, entries)`` to read: the pinned one (see :meth:`pinned`), else the current."""
        pins = _PINNED.get()
        pin = pins.get(id(self)) if pins else None
        return pin[1] if pin is not None and pin[0] is self else self._state

    def _row_ids(self, prefixes: PrefixSpec, batch_size: Optional[int], entries: dict) -> list[int]:
        names, index = entries.names_index()
        n = len(names)
        if isinstance(prefixes, Tensor):
            if prefixes.is_floating_point() or prefixes.is_complex() or prefixes.dtype == torch.bool:
                raise TypeError(f"prefix ids must be an integer tensor, got {prefixes.dtype}")
            if prefixes.dim() == 0:
                prefixes = int(prefixes)
            elif prefixes.dim() != 1:
                raise ValueError(f"prefix ids must be a [B] tensor, got shape {list(prefixes.shape)}")
            else:
                rows = prefixes.tolist()
                bad = [i for i in rows if not -1 <= i < n]
                if bad:
                    raise ValueError(f"prefix ids {bad[:8]} are not in this bank: {_id_range(n)}")
                return self._broadcast(rows, batch_size)
        if prefixes is None or isinstance(prefixes, (str, int)):
            if batch_size is None:
                raise ValueError("a single prefix for every row needs batch_size")
            prefixes = [prefixes]
        if not isinstance(prefixes, (list, tuple)):
            raise TypeError(f"prefixes must be a list, a LongTensor or a name, got {type(prefixes).__name__}")
        rows = []
        for p in prefixes:
            if p is None:
                rows.append(-1)
            elif isinstance(p, str):
                self._lookup(entries, p)
                rows.append(index[p])
            else:
                p = _as_id(p)
                if not -1 <= p < n:
                    raise ValueError(f"prefix id {p} is not in this bank: {_id_range(n)} (known "
                                     f"prefixes: {some_names(names)})")
                rows.append(p)
        return self._broadcast(rows, batch_size)

    @staticmethod
    def _broadcast(rows: list[int], batch_size: Optional[int]) -> list[int]:
        if batch_size is None:
            return rows
        batch_size = validation.int_at_least(batch_size, 0, "batch_size")
        if len(rows) == 1 and batch_size != 1:
            return rows * batch_size
        if len(rows) != batch_size:
            raise ValueError(f"got {len(rows)} prefixes for a batch of {batch_size} rows")
        return rows

    def select(self, prefixes: PrefixSpec, batch_size: Optional[int] = None,
               device: Optional[Union[str, torch.device]] = None) -> PrefixSelection:
        """The :class:`PrefixSelection` of a batch (see :meth:`ids` for ``prefixes``).

        Only the unique entries used are gathered; a batch that uses one entry gets a view of it."""
        version, entries = self._snapshot()  # one snapshot for the whole call
        rows = self._row_ids(prefixes, batch_size, entries)
        device = self.device if device is None else torch.device(device)
        names = entries.names_index()[0]
        used = set(rows)
        anchor = False
        # entries that are FSDP units of their own all-gather their parameters when called:
        # every rank calls every one of them, in every mode (an evaluation where ranks select
        # different entries paired one rank's gather of "a" with another's of "b": a silent
        # mix of shards, or a crash), and such a selection is never cached (a cache hit on one
        # rank would skip a gather that the others make)
        units = self._fsdp_units(names, entries)
        used.update(units)
        if torch.is_grad_enabled():
            if self._under_fsdp():
                # FSDP2 needs every rank to use the same parameters in a step: every trainable
                # entry joins the graph (a zero gradient where no row of this rank selects it);
                # otherwise ranks whose rows pick different prefixes get wrong gradients, silently
                used.update(i for i in entries.module_ids() if _trains(entries[names[i]]))
            # only the entries the batch uses are looked at, unless it uses no trainable one:
            # a scan of every entry's parameters at every forward cost a training step with a
            # thousand trainable prefixes more than the model's own forward did
            elif self.training and not any(_trains(entries[names[i]]) for i in used if i >= 0):
                first = next((i for i in entries.module_ids() if _trains(entries[names[i]])),
                             None)
                if first is not None and distributed.world_size() > 1:
                    # DDP: a rank whose batch selects none would reach no parameter: its reducer
                    # never joins the all-reduce, and every rank hangs. One entry joins (a zero
                    # gradient here); joining all gave entries no rank selected a zero gradient,
                    # which AdamW's weight decay and momentum then moved
                    used.add(first)
                # a training batch (the bank follows model.train()) that selects no trainable
                # entry (rows without a prefix: a micro-batch of them comes up in multi-task
                # data) had a loss without a graph when only prefixes train: backward() failed
                # with "element 0 of tensors does not require grad", stopping a Trainer's run
                anchor = first is not None and distributed.world_size() == 1
        sel = self._select(rows, used, version, entries, device, cache=not units)
        return _anchored(sel, self._anchor(device)) if anchor else sel

    @staticmethod
    def _fsdp_units(names: list, entries: dict) -> list:
        """Bank ids of the module entries that ``fully_shard`` made FSDP units of their own, in a
        multi-process run ([] otherwise)."""
        if distributed.world_size() == 1:
            return []
        return [i for i, n in enumerate(names)
                if entries[n].module is not None and distributed.is_fsdp_module(entries[n].module)]

    def _anchor(self, device: torch.device) -> Tensor:
        """A zero scalar that requires grad, held by the bank but no parameter (no optimizer
        steps it): added to the attention output of a training batch that selects no trainable
        entry, it gives the loss a graph to backpropagate without giving any entry a gradient."""
        anchors = self.__dict__.setdefault("_anchors", {})
        key = str(device)
        if key not in anchors:
            anchors[key] = torch.zeros((), device=device, requires_grad=True)
        return anchors[key]

    def _select(self, rows, used: set, version: int, entries: dict, device: torch.device,
                cache: bool = True) -> PrefixSelection:
        """:meth:`select` for bank ids ``rows`` and the set of ids ``used`` to gather (``cache``
        False: neither read from nor written to the selection cache)."""
        names = entries.names_index()[0]
        used = sorted(used, key=lambda i: (i < 0, i))  # bank order, "no prefix" last
        # tensors made under inference_mode cannot be saved for backward later: such a
        # selection is cached for inference-mode calls only
        key = (tuple(used), str(device), version, torch.is_inference_mode_enabled())
        # a trainable entry is rebuilt on every call that records autograd (its gradients must
        # flow); without autograd (generate, evaluation) it is cached like a fixed one, keyed on
        # its parameters' versions (in-place updates bump them), their storage (``p.data = t``,
        # as weight loaders and sharding do, keeps the version) and the count of optimizer
        # steps taken in this process (fused optimizers write without bumping versions), and
        # the autocast state (a projection MLP computes in the autocast dtype: an eval under
        # autocast must not hand its rounded prefix to a float32 call); an in-place write
        # through ``p.data`` outside an optimizer is not seen
        params = [p for i in used if i >= 0 and entries[names[i]].module is not None
                  for p in entries[names[i]].module.parameters()]
        cacheable = cache and (not params or not torch.is_grad_enabled() and all(
            _output_follows_parameters(entries[names[i]].module) for i in used
            if i >= 0 and entries[names[i]].module is not None))
        # a fixed entry edited in place (``bank.entry_kv(name).mul_(...)``) bumps its version: a
        # stacked copy made before the edit is not handed out again
        key = key + (tuple(_version_of(entries[names[i]].kv) for i in used
                           if i >= 0 and entries[names[i]].kv is not None),)
        if params:
            key = key + (tuple((_version_of(p), p.data_ptr()) for p in params), _OPTIMIZER_STEPS[0],
                         api.autocast_dtype(params[0]))
        with self._lock:
            cached = None
            for cache, _ in self._caches_for(version) if cacheable else ():
                cached = cache.get(key)
                if cached is not None:
                    cache.move_to_end(key)
                    break
        slot = {bank_id: j for j, bank_id in enumerate(used)}
        slots = tuple(slot[i] for i in rows)
        lens = [entries[names[i]].length if i >= 0 else 0 for i in used]
        host_row_lens = [lens[j] for j in slots]
        prefix_ids = self._ids_tensor(slots, device, version, key[3])
        if cached is not None:
            kv, prefix_lens, sel_names = cached._kv, cached.prefix_lens, cached.names
            return PrefixSelection(kv, prefix_ids, prefix_lens, sel_names, version, host_row_lens,
                                   cached.is_view)

        sel_entries = [entries[names[i]] if i >= 0 else None for i in used]
        sel_names = [e.name if e is not None else None for e in sel_entries]
        prefix_lens = torch.tensor(lens, dtype=torch.long, device=device)
        if lens:
            validation.known_range(prefix_lens, min(lens), max(lens))
        L, Hkv, D = self.num_layers, self.num_kv_heads, self.head_dim
        trainable = any(e is not None and e.kv is None for e in sel_entries)
        view = False
        if len(sel_entries) == 1:
            e = sel_entries[0]
            if e is None:
                kv = torch.zeros(L, 2, 1, Hkv, 0, D, dtype=self.dtype, device=device)
            else:
                kv = self._materialize(e).to(device).unsqueeze(2)  # a view: no copy on the bank's device
                view = _shares_storage(kv, [e.kv] if e.kv is not None else list(e.module.parameters()))
        else:  # several entries, or none (an empty batch: one empty slot)
            pmax = max(lens, default=0)
            kv = torch.zeros(L, 2, max(len(sel_entries), 1), Hkv, pmax, D, dtype=self.dtype,
                             device=device)
            if trainable:
                # built out of place so that trainable entries stay in the autograd graph
                parts = []
                for e, n in zip(sel_entries, lens):
                    t = self._materialize(e).to(device) if e is not None else kv[:, :, 0, :, :0]
                    parts.append(torch.nn.functional.pad(t, (0, 0, 0, pmax - n)))
                kv = torch.stack(parts, dim=2)
            else:
                for j, (e, n) in enumerate(zip(sel_entries, lens)):
                    if e is not None and n:
                        kv[:, :, j, :, :n].copy_(e.kv)
        sel = PrefixSelection(kv, prefix_ids, prefix_lens, sel_names, version, host_row_lens, view)
        if cacheable:
            with self._lock:
                for cache, _ in self._caches_for(version) if self._cache_size else ():
                    # the same entries at older versions or parameter values: never asked again
                    for stale in [k for k in cache if k[:4] == key[:4] and k != key]:
                        del cache[stale]
                    cache[key] = sel
                    while len(cache) > self._cache_size:
                        cache.popitem(last=False)
        return sel

    def _under_fsdp(self) -> bool:
        """Whether this is a multi-process run with the model (or the bank's entries) sharded
        by FSDP2."""
        if not self.trainable or distributed.world_size() == 1:
            return False
        model = self.model
        return distributed.uses_fsdp(model if model is not None else self)

    def _check_unsharded(self, entry: _Entry, what: str) -> None:
        if entry.module is not None and distributed.is_sharded(entry.module):
            raise ValueError(
                f"{what}: trainable entry {entry.name!r} is sharded by FSDP (fully_shard); "
                "computing it here would need the other ranks. Gather a full state dict on every "
                "rank (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True, cpu_offload=True))), load it "
                "into an unsharded copy of the model on one rank and save from there")

    def _ids_tensor(self, slots: tuple, device, version: int, inference: bool) -> Tensor:
        """``prefix_ids`` of a selection, kept per (rows, device, bank version, inference mode):
        decode steps reuse it instead of a host-to-device copy per step, and its range is known
        without reading it back (``validation.known_range``)."""
        key = (slots, str(device), version, inference)
        with self._lock:
            for _, cache in self._caches_for(version):
                hit = cache.get(key)
                if hit is not None and hit[1] == _version_of(hit[0]):  # unchanged since
                    cache.move_to_end(key)
                    return hit[0]
        ids = torch.tensor(slots, dtype=torch.long, device=device)
        if slots:
            validation.known_range(ids, min(slots), max(slots))
        with self._lock:
            for _, cache in self._caches_for(version):
                cache[key] = (ids, _version_of(ids))
                while len(cache) > 4 * CACHE_SIZE:
                    cache.popitem(last=False)
        return ids

    def _clear_caches(self) -> None:
        self._cache.clear()
        self._ids_cache.clear()
