"""Where a bank's entries come from and go to, beyond :meth:`~prefix_attn.bank.PrefixBank.add`:
PEFT prefix-tuning adapters (``load_peft`` / ``save_peft``), a prompt's KV from one prefill of
the attached model (``add_prompt``) and the whole bank's file (``save`` / ``load``,
:mod:`prefix_attn.bank_file`). A mixin of :class:`~prefix_attn.bank.PrefixBank`."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prefix_attn import bank_file, model_info, peft_format
from prefix_attn.bank_file import BANK_FILE

if TYPE_CHECKING:
    from prefix_attn.bank import PrefixBank


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


class Sources:
    """The adapter, prompt and file methods of :class:`~prefix_attn.bank.PrefixBank`."""

    # -- PEFT adapters ---------------------------------------------------------------------
    def load_peft(self, name: str, adapter_dir: str, trainable: bool = False) -> None:
        """Add (or replace) entry ``name`` from a PEFT prefix-tuning adapter folder.

        ``trainable=True`` (PEFT's ``is_trainable=True``, to continue training a saved
        adapter): a trainable prefix initialised from the adapter's K/V, as
        :func:`~prefix_attn.prefix_tuning` adds one (the base frozen; plain K/V, since an
        adapter on disk holds the folded prefix; a name already in the bank is refused).

        A missing file raises FileNotFoundError, anything else wrong a ValueError naming the file
        and the mismatch; the bank is unchanged in both cases."""
        self._check_name(name)
        model = self.model
        if trainable and model is None:
            raise RuntimeError("load_peft(..., trainable=True) needs a bank attached to a model "
                               "(PrefixBank.attach(model)): the model's base is frozen around it")
        query_heads = peft_format.query_heads_of(getattr(model, "config", None))
        kv, _ = peft_format.read_peft_adapter(adapter_dir, self.shape, query_heads)
        model_info.warn_window_vs_peft(model, f"load_peft({name!r})")
        if trainable:
            from prefix_attn import tuning

            tuning.add_trainable_kv(model, self, name, kv)
            return
        self._add_kv(name, kv, what=f"load_peft({name!r})")

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
        from prefix_attn.hf.positions import position_words

        limit = learned_position_limit(model)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than the {limit} "
                             f"{position_words(model)} of {type(model).__name__}")
        _, model_device = model_info.model_dtype_device(model)
        P = input_ids.shape[1]
        window = model_info.sliding_window(model)
        given = {}
        if window is not None:
            # the model's own cache keeps only the last window - 1 positions of its sliding
            # layers: a plain one keeps every position (the same values, computed windowed)
            from transformers import DynamicCache

            given = {cache_kwarg(model): DynamicCache()}
        # no dropout in the stored KV (a serving model is left alone: another thread's
        # add_prompt could otherwise restore the wrong mode); each module's own mode is put
        # back, not model.train() over all of them (a submodule kept in eval, a frozen part
        # without dropout, came back in training mode)
        modes = [(m, m.training) for m in model.modules()] if model.training else None
        if modes is not None:
            model.eval()
        try:
            with torch.no_grad():
                # prefixes=None: the prompt's own KV, whatever the bank's default_prefix
                out = model(input_ids=input_ids.to(model_device), use_cache=True, prefixes=None,
                            **given)
        finally:
            for m, mode in modes or ():
                m.training = mode
        cache = getattr(out, "cache", None)  # transformers >= 5.2x; older: past_key_values
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise RuntimeError(
                f"add_prompt stores the keys and values a model caches for its prompt, and "
                f"{type(model).__name__} returned none for use_cache=True"
                + (": an encoder caches nothing (its tokens attend both ways, so a prompt's KV "
                   "would depend on the text after it); give it a learned prefix "
                   "(prefix_tuning) or fixed K/V (bank.add) instead"
                   if getattr(getattr(model, "config", None), "is_decoder", None) is False
                   else ""))
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
        self._add_kv(name, kv, kind="prompt", signature=model_info.model_signature(model),
                     what=f"add_prompt({name!r})")

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
            tensors, seen = [], set()
            for e in entries.values():
                t = self._materialize(e, cast=False).detach().cpu().contiguous()
                # one module under two names: safetensors refuses tensors that share memory
                if t.untyped_storage().data_ptr() in seen and t.numel():
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
                tensors.append(t)
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
            bank._refuse_replacing_trainable(saved.names, path)
            bank._commit_many({name: bank._fixed_entry(name, kv, kind, sig) for name, kv, kind, sig
                               in zip(saved.names, saved.tensors, saved.kinds, saved.signatures)})
            if saved.default is not None:
                before = bank.default_prefix
                bank.default_prefix = saved.default
        if saved.default is not None and before not in (None, saved.default):
            warnings.warn(f"{path}: default_prefix {before!r} replaced by the saved {saved.default!r}",
                          stacklevel=2)
        return bank

