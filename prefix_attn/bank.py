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
import copy
import dataclasses
import itertools
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from prefix_attn import api, distributed, model_info, peft_format, validation
from prefix_attn.bank_names import check_name, did_you_mean, some_names  # noqa: F401 (re-exported)
from prefix_attn.bank_select import CACHE_SIZE, Selecting
from prefix_attn.bank_sources import Sources
from prefix_attn.selection import PrefixSelection

__all__ = ["PrefixBank", "PrefixSelection"]

# attach is check-then-create: two threads attaching one model must not make two banks
_ATTACH_LOCK = threading.RLock()


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


def _holds_data(what: str, device: torch.device) -> None:
    if device.type == "meta":
        raise ValueError(f"{what} is on meta: a tensor on meta holds no data (the model's weights "
                         "not loaded yet: init_empty_weights); add entries once it is loaded")


def _normal_tensor(t: Tensor) -> Tensor:
    """``t``, copied out of inference mode if it is an inference tensor (one made under
    ``torch.inference_mode()``: a bank entry added while serving must still work in a later
    forward that records autograd, e.g. training or ``no_grad``-free evaluation)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


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


def _keep_from_hf_init(module: nn.Module) -> None:
    """Mark a trainable entry's module initialised for transformers: ``post_init``,
    ``init_weights`` and ``initialize_weights`` (called to set up a head added beside the
    prefixes) re-drew every module without the mark, resetting a trained or loaded prefix to
    the initializer's values, silently (PEFT's prompt encoder sits outside the base model)."""
    for m in module.modules():
        m._is_hf_initialized = True
    for t in itertools.chain(module.parameters(), module.buffers()):
        t._is_hf_initialized = True


class _ModelLink:
    """``model._prefix_attn_link``: the model's side of its bank's weak reference. A bank
    pickles without its model; a pickled (or deep-copied) model carries this link, whose
    unpickling binds the bank's copy to the model's copy (weak references only: no cycle keeps
    a deleted model alive)."""

    __slots__ = ("_model", "_bank")

    def __init__(self, model: nn.Module, bank: "PrefixBank"):
        self._model, self._bank = weakref.ref(model), weakref.ref(bank)

    def __reduce__(self):
        return _relink, (self._model(), self._bank())


def _relink(model, bank) -> Optional[_ModelLink]:
    if model is None or bank is None:
        return None
    bank._model_ref = weakref.ref(model)
    return _ModelLink(model, bank)


class PrefixBank(Selecting, Sources, nn.Module):
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
        self._cache_size = CACHE_SIZE
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
        model._prefix_attn_link = _ModelLink(model, bank)  # carried by the model's pickles
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
        self._add_kv(name, kv, what=f"add({name!r})")

    def _add_kv(self, name: str, kv: Tensor, kind: str = "fixed", signature=None,
                what: str = "add") -> None:
        """Store ``kv`` ``[L, 2, Hkv, P, D]`` (already checked, freshly built by the caller) under ``name``."""
        entry = self._fixed_entry(name, kv, kind, signature)
        with self._lock:
            self._refuse_replacing_trainable([name], what)
            self._commit(name, entry)

    def _refuse_replacing_trainable(self, names, what: str) -> None:
        """ValueError if one of ``names`` is a trainable entry: fixed values put in its place
        orphaned its parameters (an optimizer kept stepping them) and it stopped training,
        silently, or with "element 0 of tensors does not require grad" at the next backward."""
        entries = self._state[1]
        taken = [n for n in names if n in entries and entries[n].module is not None]
        if taken:
            raise ValueError(
                f"{what}: {taken[0]!r} is a trainable prefix; fixed values in its place would "
                "orphan its parameters (an optimizer may hold them) and stop it training. Give "
                f"the new entry another name, or remove the trainable one first "
                f"(model.prefix_bank.remove({taken[0]!r})); to train on from saved values, copy "
                "them into its parameters under no_grad")

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
        _keep_from_hf_init(module)
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

    def module_name(self, name: str) -> str:
        """Where trainable entry ``name``'s module sits in the model:
        ``"prefix_bank.trainable.<key>"``, the prefix of its state-dict keys and the name PEFT's
        ``modules_to_save`` takes (``LoraConfig(modules_to_save=[bank.module_name("support")])``).
        ``<key>`` is the name with "%" and "." escaped as %25 and %2E, and a "%" put before a
        name that is an attribute of ``nn.ModuleDict`` ("train", "keys", "type", ...)."""
        entry = self._lookup(self._state[1], name)
        if entry.module_key is None:
            raise ValueError(f"prefix {name!r} is {entry.kind}, not trainable: it has no module "
                             "(its values are not in the state dict; bank.save keeps them)")
        return f"prefix_bank.trainable.{entry.module_key}"

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

    @contextlib.contextmanager
    def using_default(self, name: Optional[str]):
        """``with bank.using_default(name):`` sets :attr:`default_prefix` for the block and puts
        the one before back after it (None if that entry was removed meanwhile).
        ``using_default(None)`` is PEFT's ``disable_adapter()``: code inside that cannot pass
        ``prefixes=`` (a trainer's reference forward) runs the base model. Bank-wide, as
        PEFT's is model-wide: other threads' calls without ``prefixes=`` see it too."""
        with self._lock:
            before = self.default_prefix
            self.default_prefix = name
        try:
            yield self
        finally:
            with self._lock:
                self.__dict__["_default_prefix"] = before if before in self else None

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

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)  # locks cannot be copied or pickled
        # cached selections are rebuilt on demand: a copy or a pickle does not carry them
        state["_cache"], state["_ids_cache"] = OrderedDict(), OrderedDict()
        # a weakref cannot be pickled, and the model itself made torch.save(bank) write the
        # whole model: a pickle of the bank alone holds no model, and the model's own pickle
        # binds its bank again through its _ModelLink
        state["_model_ref"] = None
        return state

    def __setstate__(self, state):
        model = state.pop("_model_ref", None)  # pickled before _ModelLink: the model itself
        super().__setstate__(state)
        self.__dict__.setdefault("_cache_size", CACHE_SIZE)  # pickled before it existed
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
            version, entries = self._state
            try:
                probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
            except NotImplementedError:  # from meta ("cannot copy out of meta tensor"): the
                probe = fn(torch.empty(0, dtype=self.dtype))  # model attached before its load
            self._check_meta_move(entries, probe.device)
            super()._apply(fn, recurse)
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

    @staticmethod
    def _check_meta_move(entries: dict, device: torch.device) -> None:
        """Fixed and prompt entries are in no state dict: moved to meta (``model.to("meta")``)
        their values are gone for good (a warning says so), and moving them off meta again
        (``to_empty``) raises, naming them, instead of torch's "Cannot copy out of meta tensor"
        from the middle of the move."""
        fixed = [n for n, e in entries.items() if e.kv is not None]
        on_meta = [n for n in fixed if entries[n].kv.is_meta]
        if on_meta and device.type != "meta":
            raise ValueError(
                f"prefix entries {some_names(on_meta)} were moved to meta and hold no values "
                "(fixed and prompt entries are not in the state dict, so no weight loading brings "
                "them back): remove them (model.prefix_bank.remove(name)) before moving the "
                "model off meta, then add them again (PrefixBank.load of a bank.save, load_peft, "
                "add_prompt)")
        if device.type == "meta" and len(on_meta) < len(fixed):
            warnings.warn(
                f"prefix entries {some_names([n for n in fixed if n not in on_meta])} moved to "
                "meta lose their values: fixed and prompt entries are not in the state dict, so "
                "loading weights later does not bring them back (keep them with bank.save)",
                stacklevel=4)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, entries={self.names()}")
