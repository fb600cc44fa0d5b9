"""The prefix bank: named per-layer key/value prefixes attached to one model.

Storage layout (what it costs)
------------------------------
Each fixed entry is one contiguous tensor ``[L, 2, Hkv, P_n, D]`` at its own length ``P_n``
(index 0 of the ``2`` axis = keys, 1 = values), in the bank's dtype and device: an entry costs
``L * 2 * Hkv * P_n * D * itemsize`` bytes and nothing is padded to the longest entry.
A trainable entry is an ``nn.Module`` (a submodule of the bank, so of the model) whose
``forward()`` returns ``[L, 2, Hkv, P, D]``; it costs its parameters.

``select(prefixes, B)`` builds a :class:`PrefixSelection` for one batch. It holds only the
unique entries that the batch uses:

- one entry for every row: a view of the stored tensor, no copy;
- several entries: one stacked copy ``[L, 2, n, Hkv, Pmax, D]`` of the n entries used, padded to
  the longest of those n (``prefix_lens`` masks the padding). Selections of fixed entries are
  cached per (entries, their tensor versions, device, bank version), so decode steps reuse the
  same stack and an in-place edit of an entry is seen; the cache
  keeps the 8 most recent stacks and is dropped on every change of the bank.

Concurrency: the entries live in one immutable snapshot ``(version, {name: entry})`` that writers
replace as a whole under a lock (copy-on-write); readers take the snapshot once, so a reader never
sees a half-written entry, and a removed entry stays alive for selections that already hold it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import itertools
import operator
import os
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from prefix_attn import api, bank_file, distributed, model_info, peft_format, validation
from prefix_attn.bank_file import BANK_FILE
from prefix_attn.selection import PrefixSelection

__all__ = ["PrefixBank", "PrefixSelection"]

_CACHE_SIZE = 8

PrefixSpec = Union[None, str, int, Sequence[Union[None, str, int]], Tensor]

# attach is check-then-create: two threads attaching one model must not make two banks
_ATTACH_LOCK = threading.RLock()

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


@dataclass(frozen=True)
class _Entry:
    """One bank entry: ``kv`` ``[L, 2, Hkv, P, D]`` for a fixed entry, or a trainable ``module``
    (registered in ``PrefixBank.trainable`` under ``module_key``)."""

    name: str
    length: int
    kv: Optional[Tensor] = None
    module_key: Optional[str] = None
    module: Optional[nn.Module] = field(default=None, compare=False)  # kept here: readers never index the ModuleDict
    kind: str = "fixed"  # "fixed" | "prompt" (KV of a prompt, from add_prompt) | "trainable"
    # a prompt entry: a few weights of the model that computed it (see model_info.model_signature)
    signature: Optional[tuple] = field(default=None, compare=False)


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


# Beyond this many names a typo is looked for in their case only: difflib over a bank of
# 50,000 tenants took half a second of a request's time.
_FUZZY_NAMES_MAX = 2000


def did_you_mean(name, known) -> str:
    """ "; did you mean 'x'?" for a name close to one of ``known`` (a typo), else ""."""
    if not isinstance(name, str):
        return ""
    lowered = {k.lower(): k for k in known if isinstance(k, str)}
    if name.lower() in lowered:
        return f"; did you mean {lowered[name.lower()]!r}?"
    if len(lowered) > _FUZZY_NAMES_MAX:
        return ""
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def some_names(names, at_most: int = 20) -> str:
    """``names`` for an error message: all of a small bank's, the first ``at_most`` and a count
    of a large one's (a message listing 50,000 tenants was 850 KB, and showed them all)."""
    names = list(names)
    if len(names) <= at_most:
        return repr(names)
    return f"{names[:at_most]!r} and {len(names) - at_most} more"


class _Entries(dict):
    """The entries of one bank snapshot (name -> _Entry, in bank-id order; never changed once
    committed), with the names and the name -> id index built once per snapshot rather than at
    every call (a bank of 50,000 tenants spent most of each forward rebuilding them)."""
    __slots__ = ("_names_index", "_module_ids")

    def names_index(self) -> tuple:
        try:
            return self._names_index
        except AttributeError:
            names = tuple(self)
            self._names_index = (names, {n: i for i, n in enumerate(names)})
            return self._names_index

    def module_ids(self) -> tuple:
        """Bank ids of the entries that are modules (trainable entries), found once per
        snapshot: whether they train (a parameter requiring grad) is asked at every call, but a
        walk over 50,000 fixed entries to find them cost ~10 ms a forward with grad on."""
        try:
            return self._module_ids
        except AttributeError:
            self._module_ids = tuple(i for i, e in enumerate(self.values()) if e.module is not None)
            return self._module_ids

    def __reduce__(self):  # pickles and copies carry the entries, not the index built from them
        return type(self), (list(self.items()),)


def _id_range(n: int) -> str:
    """The bank ids a bank of ``n`` entries takes, for errors."""
    entries = f"ids 0..{n - 1} (a bank of {n} entr{'y' if n == 1 else 'ies'})" if n else \
        "the bank is empty"
    return f"{entries}; -1 or None for no prefix"


def _prompt_ids(input_ids, model: nn.Module) -> Tensor:
    """``add_prompt``'s token ids as a LongTensor ``[1, P]``, checked: integer ids (not text,
    not a tokenizer's whole output), one row, at least one token, within the vocabulary."""
    tokenize = "tokenize the text first and pass the ids: tokenizer(text, return_tensors='pt').input_ids"
    if isinstance(input_ids, (str, Mapping)):
        raise TypeError(f"add_prompt takes token ids ([P] or [1, P]), got a "
                        f"{type(input_ids).__name__}: {tokenize}")
    if not isinstance(input_ids, Tensor):
        try:
            input_ids = torch.tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"add_prompt takes token ids ([P] or [1, P]), got "
                            f"{type(input_ids).__name__}: {tokenize}") from None
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: a prompt prefix needs at least one token")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [P] or [1, P], got {list(input_ids.shape)}")
    try:
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # custom models may not say
        vocab = None
    if vocab is not None:
        outside = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        if outside.numel():
            raise ValueError(f"token id {int(outside[0])} is outside the vocabulary of "
                             f"{type(model).__name__} ({vocab} ids: 0..{vocab - 1})")
    return input_ids.long()


def _shares_storage(t: Tensor, held: list) -> bool:
    """Whether ``t`` reads the storage of one of ``held`` (False where a tensor subclass, such
    as FSDP's DTensor, has no plain storage)."""
    try:
        return t.untyped_storage().data_ptr() in {h.untyped_storage().data_ptr() for h in held}
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def check_name(name) -> str:
    """An entry name: a non-empty str (TypeError otherwise)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"entry name must be a non-empty str, got {name!r}")
    return name


def _holds_data(what: str, device: torch.device) -> None:
    if device.type == "meta":
        raise ValueError(f"{what} is on meta: a tensor on meta holds no data (the model's weights "
                         "not loaded yet: init_empty_weights); add entries once it is loaded")


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


def _normal_tensor(t: Tensor) -> Tensor:
    """``t``, copied out of inference mode if it is an inference tensor (one made under
    ``torch.inference_mode()``: a bank entry added while serving must still work in a later
    forward that records autograd, e.g. training or ``no_grad``-free evaluation)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


class _PinCaches:
    """The selection and id caches of one pinned call (``PrefixBank.pinned``), used once the
    bank has moved past its snapshot; they live as long as the call."""

    def __init__(self):
        self.selections: OrderedDict = OrderedDict()
        self.ids: OrderedDict = OrderedDict()


class _TrainableModules(nn.ModuleDict):
    """``PrefixBank.trainable``: the trainable entries' modules by key. An entry keeps its module
    (readers never index this dict), so a module set here in place of an entry's (PEFT's
    ``modules_to_save`` does ``setattr(bank.trainable, key, ModulesToSaveWrapper(module))``,
    and its unload sets one back) is handed to that entry, in a new snapshot: the entry trained
    nothing before, silently, while the wrapper's copy was what the optimizer stepped."""

    def __setattr__(self, name, value):
        if isinstance(value, nn.Module):
            self._replace(name, value, lambda: super(_TrainableModules, self).__setattr__(name, value))
        else:
            super().__setattr__(name, value)

    def add_module(self, name, module):  # ModuleDict's [key] = and update, register_module
        self._replace(name, module, lambda: super(_TrainableModules, self).add_module(name, module))

    def _replace(self, key: str, module, set_it) -> None:
        """``set_it()`` (which puts ``module`` under ``key``), and the entry of that key, if
        any, moved to ``module`` in the same step: its output checked first (the entry's shape,
        any length: the entry takes the new one), nothing changed when it does not fit."""
        ref = self.__dict__.get("_bank_ref")
        bank = ref() if ref is not None else None
        if bank is None:
            return set_it()
        with bank._lock:
            entry = bank._entry_of_key(key)
            if entry is not None and entry.module is not module:
                length = bank._output_length(module, f"{type(module).__name__} set as prefix "
                                                     f"{entry.name!r} in prefix_bank.trainable")
                entry = dataclasses.replace(entry, module=module, length=length)
            set_it()
            if entry is not None:
                bank._commit(entry.name, entry)

    def __getstate__(self):  # pickles and copies without the weakref (the bank sets it again)
        state = dict(super().__getstate__())
        state.pop("_bank_ref", None)
        return state


class PrefixBank(nn.Module):
    """Named KV prefixes for one model, attached as ``model.prefix_bank``.

    Fixed entries are ``[L, 2, Hkv, P, D]`` tensors (see the module docstring for the layout);
    trainable entries are submodules under ``self.trainable``. Bank ids are positions in
    :meth:`names` (insertion order; replacing a name keeps its id).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.num_layers = validation.int_at_least(num_layers, 1, "PrefixBank: num_layers")
        self.num_kv_heads = validation.int_at_least(num_kv_heads, 1, "PrefixBank: num_kv_heads")
        self.head_dim = validation.int_at_least(head_dim, 1, "PrefixBank: head_dim")
        if dtype not in model_info.BANK_DTYPES:
            raise TypeError(f"PrefixBank: dtype must be one of "
                            f"{', '.join(map(str, model_info.BANK_DTYPES))}, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.trainable = _TrainableModules()
        self.trainable.__dict__["_bank_ref"] = weakref.ref(self)
        self._lock = threading.RLock()
        self._state: tuple[int, dict[str, _Entry]] = (0, _Entries())
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = _CACHE_SIZE
        self._ids_cache: OrderedDict = OrderedDict()  # see _ids_tensor
        self._model_ref = None  # weakref to the model (no submodule cycle)

    # -- attaching ----------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module) -> "PrefixBank":
        """The bank of ``model`` (created and set as ``model.prefix_bank`` on first call; one
        bank per model even when several threads attach at once)."""
        with _ATTACH_LOCK:
            return cls._attach(model)

    @classmethod
    def _attach(cls, model: nn.Module) -> "PrefixBank":
        bank = getattr(model, "prefix_bank", None)
        if isinstance(bank, PrefixBank) and bank.model is model:
            return bank
        try:
            from prefix_attn import hf
        except ImportError:
            hf = None
        why = hf.unsupported_model(model) if hf is not None else None
        if why is not None:
            raise ValueError(f"cannot attach a prefix bank: {why}")
        L, Hkv, D = model_info.model_dims(model)
        if isinstance(bank, PrefixBank):
            # a bank set by hand (model.prefix_bank = PrefixBank(...)), or the copy that
            # copy.deepcopy(model) made: bound to this model, with its hooks (a hand-set bank
            # had none: prefixes= then failed, saying to call attach)
            if (bank.num_layers, bank.num_kv_heads, bank.head_dim) != (L, Hkv, D):
                raise ValueError(
                    f"model.prefix_bank holds prefixes of {bank.num_layers} layers, {bank.num_kv_heads} "
                    f"kv heads and head dim {bank.head_dim}; this {type(model).__name__} has {L} "
                    f"layers, {Hkv} kv heads and head dim {D}")
        else:
            caveat = hf.model_caveat(model) if hf is not None else None
            if caveat is not None:
                warnings.warn(caveat, stacklevel=2)
            dtype, device = model_info.model_dtype_device(model)
            bank = cls(L, Hkv, D, dtype=dtype, device=device)
            model.prefix_bank = bank
        bank._model_ref = weakref.ref(model)
        # the bank follows model.train() / eval() from now on; a new module is in training
        # mode, so one attached to an evaluating model would take its forwards with grad on
        # for training ones (its zero anchor, the scan for a trainable entry)
        bank.train(model.training)
        install = getattr(hf, "install_hooks", None)
        if install is not None:
            install(model)
        return bank

    @property
    def model(self) -> Optional[nn.Module]:
        return self._model_ref() if self._model_ref is not None else None

    @property
    def shape(self) -> peft_format.BankShape:
        return peft_format.BankShape(self.num_layers, self.num_kv_heads, self.head_dim)

    @property
    def version(self) -> int:
        """Incremented by every change of the entries (and by device / dtype moves)."""
        return self._state[0]

    # -- writers (copy-on-write under the lock) -----------------------------------------
    def _commit(self, name: str, entry: Optional[_Entry]) -> None:
        """Replace (or add, or with ``entry=None`` remove) one entry in a new snapshot."""
        self._commit_many({name: entry})

    def _commit_many(self, updates: dict) -> None:
        """Apply ``{name: entry or None}`` as one new snapshot (readers see all or none of it)."""
        with self._lock:
            version, entries = self._state
            new_entries = _Entries(entries)  # insertion order kept: a replaced name keeps its id
            dropped = []
            for name, entry in updates.items():
                old = new_entries.get(name)
                if entry is None:
                    self._lookup(new_entries, name)  # KeyError naming it (a concurrent remove)
                    del new_entries[name]
                else:
                    if entry.kv is not None and (entry.kv.dtype != self.dtype
                                                 or entry.kv.device != self.device):
                        # built before a dtype / device move that ran meanwhile
                        entry = dataclasses.replace(
                            entry, kv=_normal_tensor(entry.kv.to(self.device, self.dtype)))
                    new_entries[name] = entry
                replaced = entry is None or entry.module_key != getattr(old, "module_key", None)
                if old is not None and old.module_key is not None and replaced:
                    dropped.append(old.module_key)
            self._state = (version + 1, new_entries)
            self._clear_caches()
            if dropped:
                self._swap_trainable(drop=dropped)

    def _check_name(self, name) -> str:
        return check_name(name)

    def _check_kv(self, kv: Tensor, what: str) -> None:
        L, Hkv, D = self.num_layers, self.num_kv_heads, self.head_dim
        if kv.dim() != 5 or kv.shape[0] != L or kv.shape[1] != 2 or kv.shape[2] != Hkv or kv.shape[4] != D:
            raise ValueError(f"{what}: expected shape [L={L}, 2, Hkv={Hkv}, P, D={D}], got {list(kv.shape)}")

    def add(self, name: str, keys: Tensor, values: Tensor) -> None:
        """Add (or atomically replace) a fixed entry. ``keys``, ``values``: ``[L, Hkv, P, D]`` each;
        copied into the bank's storage in the bank's dtype and device."""
        self._check_name(name)
        L, Hkv, D = self.num_layers, self.num_kv_heads, self.head_dim
        for arg, t in (("keys", keys), ("values", values)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{arg} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != L or t.shape[1] != Hkv or t.shape[3] != D:
                raise ValueError(f"{arg}: expected shape [L={L}, Hkv={Hkv}, P, D={D}], got {list(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{arg} must be floating point, got {t.dtype}")
            _holds_data(f"entry {name!r}: {arg}", t.device)
        if keys.shape != values.shape:
            raise ValueError(f"keys {list(keys.shape)} and values {list(values.shape)} must have the same shape")
        kv = torch.stack([keys.detach(), values.detach()], dim=1).to(device=self.device, dtype=self.dtype)
        self._add_kv(name, kv)

    def _add_kv(self, name: str, kv: Tensor, kind: str = "fixed", signature=None) -> None:
        """Store ``kv`` ``[L, 2, Hkv, P, D]`` (already checked, freshly built by the caller) under ``name``."""
        self._commit(name, self._fixed_entry(name, kv, kind, signature))

    def _fixed_entry(self, name: str, kv: Tensor, kind: str, signature=None) -> _Entry:
        _holds_data(f"entry {name!r}: the bank", self.device)
        _holds_data(f"entry {name!r}: its values", kv.device)
        kv = kv.detach().to(device=self.device, dtype=self.dtype).contiguous()
        if kv._base is not None:  # never keep a view that pins a larger storage
            kv = kv.clone()
        return _Entry(name=name, length=kv.shape[3], kv=_normal_tensor(kv), kind=kind,
                      signature=tuple(signature) if signature is not None else None)

    def add_trainable(self, name: str, module: nn.Module) -> None:
        """Add (or replace) a trainable entry: ``module()`` returns ``[L, 2, Hkv, P, D]``.

        The module becomes a submodule of the bank (so its parameters are model parameters).
        Calls that record no autograd (generate, evaluation) reuse its output while its
        parameters are unchanged: ``module()`` must depend on them alone (a module with hooks
        or PEFT adapter layers inside is called every time)."""
        self._check_name(name)
        length = self._output_length(module, type(module).__name__)
        with self._lock:
            key = self._module_key(name)
            self._swap_trainable(add={key: module})
            self._commit(name, _Entry(name=name, length=length, module_key=key, module=module, kind="trainable"))

    def _output_length(self, module, what: str) -> int:
        """The prefix length of a trainable entry's ``module``, whose output is checked."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        with torch.no_grad():
            out = module()
        if not isinstance(out, Tensor):
            raise TypeError(f"{what}() must return a Tensor, got {type(out).__name__}")
        self._check_kv(out, f"{what}() output")
        return out.shape[3]

    def _swap_trainable(self, add: Optional[dict] = None, drop=()) -> None:
        """Replace ``self.trainable``'s module dict by a new one (``add`` in, ``drop`` out),
        sorted by key: the parameter order (DDP's broadcast and bucketing, optimizer state)
        then depends on the names, not on the order each process added them. One assignment:
        a thread walking the model's modules meanwhile (``model.train()``, ``named_parameters``,
        ``state_dict``) keeps walking the old dict instead of one changing under it."""
        drop = set(drop)
        modules = {k: m for k, m in self.trainable._modules.items() if k not in drop}
        modules.update(add or {})
        self.trainable.__dict__["_modules"] = OrderedDict(sorted(modules.items()))

    def _entry_of_key(self, key: str) -> Optional[_Entry]:
        """The trainable entry whose module is ``self.trainable[key]``, if any."""
        return next((e for e in self._state[1].values() if e.module_key == key), None)

    def _module_key(self, name: str) -> str:
        """The key of trainable entry ``name`` in ``self.trainable`` (so in the state dict:
        ``prefix_bank.trainable.<key>.*``): the name itself, with "%" and "." escaped as
        %25 and %2E, and a leading "%" where it would shadow a ModuleDict attribute ("train",
        "keys", ...). One key per name, whatever the order entries were created or removed in,
        so a checkpoint loads each prefix back into the entry of the same name."""
        key = name.replace("%", "%25").replace(".", "%2E")
        if hasattr(self.trainable, key) and key not in self.trainable._modules:
            key = "%" + key  # escaped names start with "%2" at most: no clash
        return key

    @staticmethod
    def _name_of_key(key: str) -> str:
        """The entry name of module key ``key`` (:meth:`_module_key` undone)."""
        if key.startswith("%") and key[1:3] not in ("25", "2E"):
            key = key[1:]  # the "%" put before a name that shadows a ModuleDict attribute
        return re.sub("%(25|2E)", lambda m: "%" if m.group(1) == "25" else ".", key)

    def remove(self, name: str) -> None:
        """Remove an entry (KeyError if unknown). Later entries' ids shift down by one. The
        :attr:`default_prefix`, if it is this entry, becomes None."""
        with self._lock:
            self._lookup(self._state[1], name)
            self._commit(name, None)
            if self.__dict__.get("_default_prefix") == name:
                self.__dict__["_default_prefix"] = None

    def clear(self) -> None:
        """Remove every entry (and the :attr:`default_prefix`)."""
        with self._lock:
            version, entries = self._state
            self._state = (version + 1, _Entries())
            self._clear_caches()
            self._swap_trainable(drop=list(self.trainable.keys()))
            self.__dict__["_default_prefix"] = None

    @property
    def default_prefix(self) -> Optional[str]:
        """The entry that a forward or ``generate`` of the model applies to every row when
        called without ``prefixes=`` (code that cannot pass it: a trainer's own generate and
        forwards, a pipeline, an evaluation harness); None (the default): no prefix then.
        ``prefixes=`` given (``None`` included: no prefix) wins. A :meth:`pinned` block (a
        ``generate`` call) keeps the one it started with. Removing the entry sets it back to
        None. :meth:`save` keeps it and :meth:`load` sets it again."""
        return self.__dict__.get("_default_prefix")

    @default_prefix.setter
    def default_prefix(self, name: Optional[str]) -> None:
        with self._lock:  # not set to an entry a concurrent remove() takes away
            if name is not None:
                self._check_name(name)
                self._lookup(self._state[1], name)  # KeyError naming it and the known names
                self.__dict__["_had_default"] = True
            self.__dict__["_default_prefix"] = name

    def _default_in_call(self) -> Optional[str]:
        """:attr:`default_prefix` as a :meth:`pinned` block found it (else as it is now)."""
        if not self.__dict__.get("_had_default"):
            return None
        pins = _PINNED.get()
        pin = pins.get(id(self)) if pins else None
        return pin[3] if pin is not None and pin[0] is self else self.__dict__.get("_default_prefix")

    # -- readers -------------------------------------------------------------------
    def names(self) -> list[str]:
        """Entry names in bank-id order."""
        return list(self._state[1])

    def __len__(self) -> int:
        return len(self._state[1])

    def __contains__(self, name) -> bool:
        return name in self._state[1]

    @staticmethod
    def _lookup(entries: dict, name: str) -> _Entry:
        try:
            return entries[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown prefix {name!r}{did_you_mean(name, entries)}; known prefixes: "
                           f"{some_names(entries)}") from None

    def id_of(self, name: str) -> int:
        """The bank id (position in :meth:`names`) of ``name``."""
        entries = self._state[1]
        self._lookup(entries, name)
        return entries.names_index()[1][name]

    def entry_len(self, name: str) -> int:
        """P of one entry."""
        return self._lookup(self._state[1], name).length

    def entry_kv(self, name: str) -> Tensor:
        """``[L, 2, Hkv, P, D]`` of one entry (the stored tensor for a fixed entry; ``module()``
        for a trainable one, in the graph)."""
        entry = self._lookup(self._state[1], name)
        return self._materialize(entry)

    def get(self, name: str) -> tuple[Tensor, Tensor]:
        """``(keys, values)``, each ``[L, Hkv, P, D]``, of one entry."""
        kv = self.entry_kv(name)
        return kv[:, 0], kv[:, 1]

    def is_trainable(self, name: str) -> bool:
        return self._lookup(self._state[1], name).module_key is not None

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

    def kind(self, name: str) -> str:
        """The entry's kind: ``fixed``, ``prompt`` (a prompt's KV: the text after it continues
        the prompt) or ``trainable``."""
        return self._lookup(self._state[1], name).kind

    def _entry_nbytes(self, entry: _Entry) -> int:
        if entry.kv is not None:
            return entry.kv.numel() * entry.kv.element_size()
        module = entry.module
        return sum(p.numel() * p.element_size() for p in itertools.chain(module.parameters(), module.buffers()))

    def entry_nbytes(self, name: str) -> int:
        """Bytes one entry holds (a fixed entry's tensor, or a trainable module's parameters and buffers)."""
        return self._entry_nbytes(self._lookup(self._state[1], name))

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries (excluding the selection cache, see :attr:`cache_nbytes`)."""
        return sum(self._entry_nbytes(e) for e in self._state[1].values())

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by cached stacked selections (copies, freed on any change of the bank)."""
        with self._lock:
            return sum(sel.nbytes for sel in self._cache.values() if not sel.is_view)

    @property
    def cache_size(self) -> int:
        """How many selections are kept for reuse (default 8; the least recently used go first).
        Each stacked one (a batch mixing several entries) holds a copy of its entries: with
        many tenants mixed in changing ways, lower it to bound that memory (0: keep none; a
        batch of one fixed entry, or of one trainable entry without a projection, is a view
        and costs nothing)."""
        return self._cache_size

    @cache_size.setter
    def cache_size(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {n!r}")
        with self._lock:
            self._cache_size = n
            while len(self._cache) > n:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        """Drop the cached selections (they are rebuilt on demand)."""
        with self._lock:
            self._clear_caches()

    def _materialize(self, entry: _Entry, cast: bool = True) -> Tensor:
        """``[L, 2, Hkv, P, D]`` of an entry; a trainable one in the bank's dtype unless
        ``cast=False`` (its parameters' own dtype and precision, autocast or not: what save /
        save_peft write)."""
        if entry.kv is not None:
            return entry.kv
        param = next(entry.module.parameters(), None)
        if not cast and param is not None and api.autocast_dtype(param) is not None:
            with torch.autocast(param.device.type, enabled=False):
                out = entry.module()
        else:
            out = entry.module()
        if distributed.is_dtensor(out):
            raise ValueError(
                f"trainable entry {entry.name!r} returned a sharded tensor (DTensor): its "
                "parameters are sharded but were not gathered for this call. fully_shard the "
                "model (and its layers) or each module of prefix_bank.trainable, not the "
                "PrefixBank itself (its forward is never called, so FSDP never gathers it)")
        self._check_kv(out, f"trainable entry {entry.name!r}")
        return out.to(self.dtype) if cast else out

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
                while len(cache) > 4 * _CACHE_SIZE:
                    cache.popitem(last=False)
        return ids

    def _clear_caches(self) -> None:
        self._cache.clear()
        self._ids_cache.clear()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)  # locks cannot be copied or pickled
        # cached selections are rebuilt on demand: a copy or a pickle does not carry them
        state["_cache"], state["_ids_cache"] = OrderedDict(), OrderedDict()
        state["_model_ref"] = self.model  # a weakref cannot be pickled: the model itself (pickle
        return state                      # keeps the model <-> bank cycle through its memo)

    def __setstate__(self, state):
        model = state.pop("_model_ref", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_cache_size", _CACHE_SIZE)  # pickled before it existed
        version, entries = self._state
        if not isinstance(entries, _Entries):  # pickled before snapshots kept their index
            self._state = (version, _Entries(entries))
        self._lock = threading.RLock()
        self._model_ref = weakref.ref(model) if model is not None else None
        if type(self.trainable) is nn.ModuleDict:  # pickled before it told the bank of changes
            self.trainable.__class__ = _TrainableModules
        self.trainable.__dict__["_bank_ref"] = weakref.ref(self)

    def __deepcopy__(self, memo):
        """A copy of the bank; inside ``copy.deepcopy(model)`` it belongs to the model's copy."""
        model = self.model
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        state["_model_ref"] = None
        new.__setstate__(copy.deepcopy(state, memo))
        if model is not None:
            new._model_ref = weakref.ref(memo.get(id(model), model))
        return new

    # -- device / dtype moves ------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        with self._lock:  # writers change self.trainable, which super()._apply walks
            super()._apply(fn, recurse)
            version, entries = self._state
            try:
                probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
            except NotImplementedError:  # from meta ("cannot copy out of meta tensor"): the
                probe = fn(torch.empty(0, dtype=self.dtype))  # model attached before its load
            # entries follow the probe's dtype and device (fn itself may be a conversion that
            # does not apply to them: .to(memory_format=torch.channels_last) needs rank 4); a
            # dtype no bank holds (model.to(torch.float8_e4m3fn)) leaves theirs as it is
            dtype = probe.dtype if probe.dtype in model_info.BANK_DTYPES else self.dtype

            def move(kv):
                kv = _normal_tensor(kv.to(device=probe.device, dtype=dtype))
                if probe.is_shared() and kv.device.type == "cpu" and not kv.is_shared():
                    kv.share_memory_()  # model.share_memory(): fixed entries too (forked workers)
                return kv

            moved = _Entries((n, dataclasses.replace(e, kv=move(e.kv)) if e.kv is not None else e)
                             for n, e in entries.items())
            self.dtype, self.device = dtype, probe.device
            self._state = (version + 1, moved)
            self._clear_caches()
        return self

    # -- PEFT adapters ---------------------------------------------------------------------
    def load_peft(self, name: str, adapter_dir: str) -> None:
        """Add (or replace) entry ``name`` from a PEFT prefix-tuning adapter folder.

        A missing file raises FileNotFoundError, anything else wrong a ValueError naming the file
        and the mismatch; the bank is unchanged in both cases."""
        self._check_name(name)
        cfg = getattr(self.model, "config", None)
        # multi-query GPT-BigCode: older PEFT saved every query head (it served head 0)
        query_heads = (getattr(cfg, "num_attention_heads", None)
                       if getattr(cfg, "model_type", None) == "gpt_bigcode" else None)
        kv, _ = peft_format.read_peft_adapter(adapter_dir, self.shape, query_heads)
        model_info.warn_window_vs_peft(self.model, f"load_peft({name!r})")
        self._add_kv(name, kv)

    def save_peft(self, name: str, adapter_dir: str) -> None:
        """Write entry ``name`` as a PEFT adapter folder (a trainable entry is folded: ``module()``
        under no_grad, in its parameters' dtype, float32 as PEFT writes it, not rounded to a
        bf16/fp16 model's). Only the prefix is written: a head trained beside it (PEFT's
        ``modules_to_save``) is the model's to save."""
        entry = self._lookup(self._state[1], name)
        self._check_unsharded(entry, "save_peft")
        with torch.no_grad():
            kv = self._materialize(entry, cast=False)
        model = self.model
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        peft_format.write_peft_adapter(adapter_dir, kv, base_model_name_or_path=base,
                                       task_type=peft_format.task_type_of(model))
        if model is not None:
            # a module unfrozen beside the prefix in a frozen base (a classification head):
            # PEFT's adapter would hold it (modules_to_save); a base never frozen says nothing
            base = [(n, p) for n, p in model.named_parameters() if not n.startswith("prefix_bank.")]
            others = [n for n, p in base if p.requires_grad]
            if others and len(others) < len(base):
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                warnings.warn(f"save_peft({name!r}) wrote the prefix only: the model's other trainable "
                              f"parameters ({shown}) are not in the adapter (PEFT would save a head as "
                              f"modules_to_save); save them yourself, e.g. torch.save of their "
                              f"state_dict", stacklevel=2)

    # -- prompt prefixes ---------------------------------------------------------------------
    def add_prompt(self, name: str, input_ids: Tensor) -> None:
        """Add (or replace) entry ``name`` holding the KV of a prompt (``[P]`` or ``[1, P]`` ids),
        from one prefill through the attached model: keys keep the RoPE of positions 0..P-1."""
        self._check_name(name)
        model = self.model
        if model is None:
            gone = self._model_ref is not None  # the bank only holds a weak reference
            raise RuntimeError("add_prompt needs a bank attached to a model (PrefixBank.attach(model))"
                               + ("; the model this bank was attached to no longer exists" if gone else ""))
        input_ids = _prompt_ids(input_ids, model)
        from prefix_attn.hf import cache_kwarg, learned_position_limit

        limit = learned_position_limit(model)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than the {limit} "
                             f"learned positions of {type(model).__name__}")
        _, model_device = model_info.model_dtype_device(model)
        P = input_ids.shape[1]
        window = model_info.sliding_window(model)
        given = {}
        if window is not None:
            # the model's own cache keeps only the last window - 1 positions of its sliding
            # layers: a plain one keeps every position (the same values, computed windowed)
            from transformers import DynamicCache

            given = {cache_kwarg(model): DynamicCache()}
        was_training = model.training
        if was_training:  # no dropout in the stored KV (a serving model is left alone: another
            model.eval()  # thread's add_prompt could otherwise restore the wrong mode)
        try:
            with torch.no_grad():
                # prefixes=None: the prompt's own KV, whatever the bank's default_prefix
                out = model(input_ids=input_ids.to(model_device), use_cache=True, prefixes=None,
                            **given)
        finally:
            if was_training:
                model.train()
        cache = getattr(out, "cache", None)  # transformers >= 5.2x; older: past_key_values
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache for use_cache=True")
        kv = model_info.cache_to_kv(cache, self.num_layers, P)
        self._check_kv(kv, "prompt KV")
        if window is not None:
            beyond = (f"; this prompt ({P} tokens) does not fit: the model itself would hide its "
                      f"first {P - window + 1} tokens from the next one") if P >= window else ""
            warnings.warn(
                f"add_prompt({name!r}): {type(model).__name__} has sliding-window layers ({window} "
                "tokens); a prefix is never windowed, so every later token sees the whole prompt "
                "and the text after it equals the model run on prompt + text only while both fit "
                f"in the window{beyond}", stacklevel=2)
        self._add_kv(name, kv, kind="prompt", signature=model_info.model_signature(model))

    # -- whole-bank save / load -------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write every entry (trainable ones folded) to ``directory/prefix_bank.safetensors``
        atomically (temporary file + os.replace); names, kinds, dims and the
        :attr:`default_prefix` in its metadata (:mod:`prefix_attn.bank_file`)."""
        with self._lock:  # the default and the entries as one state
            _, entries = self._state
            default = self.__dict__.get("_default_prefix")
        for entry in entries.values():
            self._check_unsharded(entry, "PrefixBank.save")
        with torch.no_grad():
            tensors = [self._materialize(e, cast=False).detach().cpu().contiguous()
                       for e in entries.values()]
        bank_file.write(directory, bank_file.SavedBank(
            names=list(entries),
            kinds=["prompt" if e.kind == "prompt" else "fixed" for e in entries.values()],
            signatures=[list(e.signature) if e.signature is not None else None for e in entries.values()],
            dims=(self.num_layers, self.num_kv_heads, self.head_dim), tensors=tensors,
            default=default if default in entries else None))

    @classmethod
    def load(cls, directory: str, model: nn.Module) -> "PrefixBank":
        """Attach a bank to ``model`` and add (replacing same names) every entry saved in ``directory``.
        Everything is checked before the bank changes, and all entries appear in one snapshot.
        A saved :attr:`default_prefix` becomes the bank's (a different one it had is replaced,
        with a warning); a file saved without one leaves the bank's as it was."""
        saved = bank_file.read(directory)
        path = os.path.join(directory, BANK_FILE)
        try:  # the model's dims without attaching: a refused file leaves the model as it was
            want = model_info.model_dims(model)
        except ValueError:
            cls.attach(model)  # raises why the model cannot have a bank
            raise
        if saved.dims != want:
            raise ValueError(f"{path}: saved for (L, Hkv, D)={saved.dims}, but the model has {want}")
        shape = cls(*want)
        for name, kv in zip(saved.names, saved.tensors):
            shape._check_kv(kv, f"{path}: entry {name!r}")
        bank = cls.attach(model)
        here = model_info.model_signature(model) if any(saved.signatures) else None
        other = [n for n, sig in zip(saved.names, saved.signatures)
                 if sig and not model_info.same_signature(sig, here)]
        if other:
            warnings.warn(
                f"{path}: the prompt entries {other} were computed by another model (its weights "
                f"differ from {type(model).__name__}'s): their KV does not fit this model; "
                "recompute them here with add_prompt", stacklevel=2)
        with bank._lock:  # the entries and the default they name as one change
            bank._commit_many({name: bank._fixed_entry(name, kv, kind, sig) for name, kv, kind, sig
                               in zip(saved.names, saved.tensors, saved.kinds, saved.signatures)})
            if saved.default is not None:
                before = bank.default_prefix
                bank.default_prefix = saved.default
        if saved.default is not None and before not in (None, saved.default):
            warnings.warn(f"{path}: default_prefix {before!r} replaced by the saved {saved.default!r}",
                          stacklevel=2)
        return bank

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, entries={self.names()}")
