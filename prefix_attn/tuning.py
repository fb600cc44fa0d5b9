"""Prefix tuning on the fused path: the trainable prefix module and ``prefix_tuning(model, ...)``.

``PrefixParameters`` has the parameter names and layout of PEFT's ``PrefixEncoder``
(``embedding`` and, with a projection, ``transform``), so PEFT's initial prefix can be copied
into it with ``load_state_dict`` and its plain K/V are exactly PEFT's ``prompt_embeddings``:

- plain: ``embedding.weight`` ``[P, L * 2 * Hkv * D]``;
- P-tuning v2 reparameterisation (PEFT's ``prefix_projection``): ``embedding.weight``
  ``[P, Hkv * D]`` then ``transform`` = Linear(Hkv*D, hidden) -> Tanh -> Linear(hidden, L*2*Hkv*D).

``forward()`` returns ``[L, 2, Hkv, P, D]`` (a view of the ``[P, L, 2, Hkv, D]`` rows, no copy
for the plain form), the bank's trainable-entry contract. The bank hands one copy of it to
the attention kernel for all the rows that select it, and the kernel's backward returns the
gradient summed over those rows: no per-row copy in forward or backward. ``bank.save_peft``
folds the projection (runs ``forward()`` once) and writes plain K/V in PEFT's format.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from . import distributed, validation
from .bank import PrefixBank, check_name
from .model_info import model_dims, warn_window_vs_peft
from . import hf
from .hf import ATTN_NAME

__all__ = ["PrefixParameters", "prefix_tuning", "from_peft", "trainable_parameters",
           "get_nb_trainable_parameters", "print_trainable_parameters", "enable_checkpointing", "unload"]


class PrefixParameters(nn.Module):
    """A trainable prefix of ``num_virtual_tokens`` positions for every layer.

    Args: num_layers L, num_kv_heads Hkv, head_dim D, num_virtual_tokens P;
    projection_hidden_size: None for plain K/V, else the hidden size of the MLP.
    Parameters are created in float32 (and follow ``model.to(dtype)`` like any parameter;
    :func:`from_peft` keeps a float64 encoder's float64); the bank casts the output to the
    model's dtype.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_virtual_tokens: int, projection_hidden_size: Optional[int] = None,
                 device=None):
        super().__init__()
        num_virtual_tokens = validation.int_at_least(num_virtual_tokens, 1, "num_virtual_tokens")
        if projection_hidden_size is not None:
            projection_hidden_size = validation.int_at_least(projection_hidden_size, 1,
                                                             "projection_hidden_size")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        token_dim = num_kv_heads * head_dim
        out_dim = num_layers * 2 * token_dim
        kw = dict(device=device, dtype=torch.float32)
        if projection_hidden_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **kw)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden_size, **kw), nn.Tanh(),
                                           nn.Linear(projection_hidden_size, out_dim, **kw))

    @property
    def projection(self) -> bool:
        return self.transform is not None

    def rows(self) -> torch.Tensor:
        """PEFT's ``prompt_embeddings``: ``[P, L * 2 * Hkv * D]``."""
        x = self.embedding.weight
        # offloaded by accelerate (cpu_offload, a device_map putting the bank on "disk"): the
        # weights are on meta and its hooks load them around a module call only
        offloaded = x.is_meta
        if offloaded:
            x = self.embedding(torch.arange(self.num_virtual_tokens))
        if self.transform is None:
            return x
        first, act, last = self.transform
        if offloaded or not (torch.is_grad_enabled() and isinstance(act, nn.Tanh)
                and type(first) is nn.Linear and type(last) is nn.Linear):
            return self.transform(x)
        return _ProjectedRows.apply(x, first.weight, first.bias, last.weight, last.bias)

    def forward(self) -> torch.Tensor:
        """``[L, 2, Hkv, P, D]`` keys (index 0) and values (index 1) of every layer."""
        L, H, D, P = self.num_layers, self.num_kv_heads, self.head_dim, self.num_virtual_tokens
        out = self.rows().view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)
        if distributed.is_fsdp_module(self):
            # an FSDP unit of its own frees the gathered weight after its forward: not a view
            # of it (nor of the projection's output, which FSDP warns about on every forward)
            out = out.clone()
        return out

    def extra_repr(self) -> str:
        return (f"L={self.num_layers}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"P={self.num_virtual_tokens}, projection={self.projection}")


class _ProjectedRows(torch.autograd.Function):
    """``Linear -> Tanh -> Linear`` of the prefix MLP with a backward that can run more than
    once. Every layer reads the same folded prefix; under reentrant activation checkpointing
    (``use_reentrant=True``) each layer runs its own backward through it, and the second one
    found the saved tensors of ``nn.Sequential`` freed ("backward through the graph a second
    time"). Here the two activations are kept on ``ctx`` (not ``save_for_backward``, which
    frees them), so each layer's backward adds its part to the parameters' gradients. One
    backward per step otherwise, as before; L under reentrant checkpointing (each one a whole
    MLP backward)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = torch.tanh(nn.functional.linear(x, w1, b1))
        ctx.x, ctx.h, ctx.w1, ctx.w2 = x, h, w1, w2
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return nn.functional.linear(h, w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, h, w1, w2 = ctx.x, ctx.h, ctx.w1, ctx.w2
        ct = h.dtype  # the forward's compute dtype (bf16 under autocast): grads in it, as
        grad = grad.to(ct)  # autograd's would be, then cast to each parameter's dtype
        gw2 = (grad.t() @ h).to(w2.dtype)
        gb2 = grad.sum(0).to(w2.dtype) if ctx.has_b2 else None
        ga = (grad @ w2.to(ct)) * (1 - h * h)  # through tanh
        gw1 = (ga.t() @ x.to(ct)).to(w1.dtype)
        gb1 = ga.sum(0).to(w1.dtype) if ctx.has_b1 else None
        return (ga @ w1.to(ct)).to(x.dtype), gw1, gb1, gw2, gb2


def _use_fused_attention(model: nn.Module) -> None:
    if hf.attn_implementation(model) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


# PrefixTuningConfig's fields, as keywords of prefix_tuning: what to write instead
_PEFT_KEYWORDS = {
    "prefix_projection": "projection_hidden_size=N (the MLP's hidden size; PEFT's default is "
                         "token_dim, num_kv_heads * head_dim)",
    "encoder_hidden_size": "projection_hidden_size=N",
    **dict.fromkeys(("num_layers", "num_attention_heads", "token_dim"),
                    "nothing: it is read from the model, as PEFT reads it"),
    **dict.fromkeys(("task_type", "peft_type", "inference_mode", "init_weights", "modules_to_save",
                     "num_transformer_submodules", "base_model_name_or_path", "revision",
                     "auto_mapping", "peft_version"),
                    "prefix_tuning(model, peft.PrefixTuningConfig(...)) with it in the config"),
}


_PROJECTION_KEYWORDS = ("prefix_projection", "encoder_hidden_size")
# prefix_projection False or not given: PEFT has no projection (encoder_hidden_size unused)
_NO_PROJECTION = ("nothing: without prefix_projection=True PEFT's prefix has no projection, as "
                  "prefix_tuning's has none by default (projection_hidden_size=None)")


def _peft_keywords_explained(fn):
    """A PrefixTuningConfig field given as a keyword (``prefix_tuning(model,
    prefix_projection=True)``) says what to write, not only Python's "unexpected keyword"."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        given = [k for k in kwargs if k in _PEFT_KEYWORDS]
        if given:
            hint = _PEFT_KEYWORDS[given[0]]
            if given[0] in _PROJECTION_KEYWORDS and not kwargs.get("prefix_projection"):
                hint = _NO_PROJECTION  # PEFT reads encoder_hidden_size only with a projection
            raise TypeError(f"prefix_tuning() takes no {given[0]}= (a field of PEFT's "
                            f"PrefixTuningConfig); write {hint}")
        return fn(*args, **kwargs)
    return call


@_peft_keywords_explained
def prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20,
                  projection_hidden_size: Optional[int] = None, name: str = "default") -> PrefixParameters:
    """Freeze every base parameter of ``model`` and add one trainable prefix ``name`` to its bank.

    Call it once per task to train several prefixes together (each row of a batch picks its
    own with ``prefixes=[...]``); prefixes added earlier stay trainable, and a name already in
    the bank is refused (ValueError). Only the first call freezes the base: a module made
    trainable after it (``model.classifier.requires_grad_(True)`` for a new classification
    head, as PEFT's ``modules_to_save``) stays trainable through later calls. Switches the
    model to ``attn_implementation="prefix_attn"`` if it uses another one. Returns the new
    module (its parameters are the ones to give the optimizer; with an unfrozen head, give it
    :func:`trainable_parameters`).

    ``num_virtual_tokens`` may also be PEFT's ``PrefixTuningConfig`` (``prefix_tuning(model,
    config)``, as ``get_peft_model(model, config)``): its ``num_virtual_tokens``, and
    ``encoder_hidden_size`` as ``projection_hidden_size`` when ``prefix_projection`` (PEFT builds
    no MLP in ``inference_mode``), ``init_weights="zero"``, and ``modules_to_save`` (with a
    SEQ_CLS / TOKEN_CLS / QUESTION_ANS ``task_type``, its head too) made trainable beside the
    prefix, as PEFT trains them (in place: no copy of them is kept); ``token_dim`` and
    ``num_attention_heads`` come from the model, as PEFT takes them; an encoder-decoder's
    ``num_transformer_submodules=2`` (``task_type="SEQ_2_SEQ_LM"``) is refused.
    """
    zero, heads = False, []
    if hasattr(num_virtual_tokens, "peft_type"):
        num_virtual_tokens, projection_hidden_size, zero, heads = _from_peft_config(
            model, num_virtual_tokens, projection_hidden_size)
    validation.int_at_least(num_virtual_tokens, 1, "num_virtual_tokens")  # before the model changes
    if projection_hidden_size is not None:
        validation.int_at_least(projection_hidden_size, 1, "projection_hidden_size")
    check_name(name)
    bank = PrefixBank.attach(model)
    with torch.inference_mode(False):  # parameters, not inference tensors (they would fail later)
        module = PrefixParameters(bank.num_layers, bank.num_kv_heads, bank.head_dim,
                                  num_virtual_tokens, projection_hidden_size, device=bank.device)
        if zero:  # PEFT's init_weights="zero": the last layer of the prefix's encoder
            with torch.no_grad():
                for p in (module.transform[-1] if module.projection else module.embedding).parameters():
                    p.zero_()
    add_prefixes(model, bank, {name: module}, trainable=True)
    for head in heads:  # PEFT's modules_to_save (and its task's head) train with the prefix
        head.requires_grad_(True)
    return module


def _from_peft_config(model: nn.Module, config, projection_hidden_size) -> tuple:
    """``(num_virtual_tokens, projection_hidden_size, zero_init, modules_to_train)`` of a PEFT
    ``PrefixTuningConfig``."""
    kind = str(getattr(config, "peft_type", None))
    if not kind.endswith("PREFIX_TUNING"):
        raise ValueError(f"prefix_tuning takes a PrefixTuningConfig, got a {type(config).__name__} "
                         f"({kind}); for LoRA and prefix tuning together see the README's "
                         f"'Coming from PEFT'")
    if projection_hidden_size is not None:
        raise TypeError("projection_hidden_size given beside a PrefixTuningConfig: set it in the "
                        "config (prefix_projection=True, encoder_hidden_size=...)")
    L, H, D = model_dims(model)
    layers = getattr(config, "num_layers", None)
    if layers is not None and layers != L:
        raise ValueError(f"PrefixTuningConfig(num_layers={layers}), but the model has {L} "
                         f"layers: leave num_layers unset (None), it is read from the model")
    task = str(getattr(config, "task_type", None) or "").rpartition(".")[2]
    submodules = getattr(config, "num_transformer_submodules", None)
    if (submodules if submodules is not None else 2 if task == "SEQ_2_SEQ_LM" else 1) != 1:
        raise ValueError(f"PrefixTuningConfig(task_type={task or None!r}, num_transformer_submodules="
                         f"{submodules}): a prefix for an encoder and a decoder; prefix_attn "
                         f"trains one for the model's one stack (num_transformer_submodules=1)")
    init = getattr(config, "init_weights", None)
    if init not in (None, "zero"):
        raise ValueError(f"PrefixTuningConfig(init_weights={init!r}): PEFT knows None and 'zero'")
    hidden = None
    if getattr(config, "prefix_projection", False) and not getattr(config, "inference_mode", False):
        # PEFT's default: token_dim (Hkv * D under GQA)
        hidden = getattr(config, "encoder_hidden_size", None) or H * D
    return config.num_virtual_tokens, hidden, init == "zero", _modules_to_save(model, config, task)


# the heads PEFT's task wrappers add to modules_to_save
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _modules_to_save(model: nn.Module, config, task: str) -> list:
    """The modules PEFT's ``get_peft_model`` trains beside the prefix: ``modules_to_save``
    (matched as PEFT matches them: a module whose name ends with one) and, for a SEQ_CLS /
    TOKEN_CLS / QUESTION_ANS task, its head. A ``modules_to_save`` entry that names no module is
    refused (PEFT trains nothing for it)."""
    given = list(getattr(config, "modules_to_save", None) or ())
    names = given + [n for n in _TASK_HEADS.get(task, ()) if n not in given]
    found = {key: [m for path, m in model.named_modules() if path and path.endswith(key)]
             for key in names}
    missing = [key for key in given if not found[key]]
    if missing:
        raise ValueError(f"PrefixTuningConfig(modules_to_save={given}): no module of "
                         f"{type(model).__name__} is named {missing} (or ends so)")
    return [m for key in names for m in found[key]]


def _add_trainable(model: nn.Module, bank: PrefixBank, name: str, module: PrefixParameters) -> None:
    if name in bank:  # replacing would orphan the parameters an optimizer may already hold
        raise ValueError(f"a prefix named {name!r} is already in the bank ({bank.kind(name)}); "
                         f"choose another name or remove it first: model.prefix_bank.remove({name!r})")
    _use_fused_attention(model)
    if not getattr(bank, "_base_frozen", False):
        # the first call freezes the base (all but the bank's trainable entries, which may have
        # been added by bank.add_trainable before); later ones keep what the user unfroze since
        # (e.g. a classification head). add_prefixes puts it back if the add fails.
        keep = {id(p) for p in bank.trainable.parameters()} | _peft_adapter_parameters(model)
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        bank._base_frozen = True
    bank.add_trainable(name, module)


def add_trainable_kv(model: nn.Module, bank: PrefixBank, name: str, kv: torch.Tensor) -> PrefixParameters:
    """Add a trainable prefix ``name`` initialised from plain K/V ``kv`` ``[L, 2, Hkv, P, D]``
    (a PEFT adapter's ``prompt_embeddings``), as :func:`prefix_tuning` adds one: the base
    frozen, the parameters in float32 (float64 kept)."""
    check_name(name)
    if torch.device(bank.device).type == "meta":  # the values copied into meta would be dropped
        raise ValueError(f"prefix {name!r}: the model's weights are on meta (not loaded yet): the "
                         f"adapter's values would be dropped; add it once the model is loaded")
    L, _, H, P, D = kv.shape
    with torch.inference_mode(False), torch.no_grad():  # parameters, not inference tensors
        module = PrefixParameters(L, H, D, P, device=bank.device)
        if kv.dtype == torch.float64:
            module.double()
        rows = kv.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)  # PEFT's prompt_embeddings
        module.embedding.weight.copy_(rows)
    add_prefixes(model, bank, {name: module}, trainable=True)
    return module


def _peft_adapter_parameters(model: nn.Module) -> set:
    """ids of the trainable parameters of PEFT adapter layers (LoRA, IA3, ...) in ``model``:
    prefix_tuning on a PeftModel's base model (``peft_model.get_base_model()``, as its refusal
    of the wrapper says) trains the prefixes with its adapters, not instead of them."""
    ids = set()
    for m in model.modules():
        for attr in getattr(m, "adapter_layer_names", ()) or ():
            part = getattr(m, attr, None)
            if isinstance(part, nn.Module):
                ids.update(id(p) for p in part.parameters() if p.requires_grad)
    return ids


def from_peft(peft_model, trainable: bool = True) -> nn.Module:
    """The base model of a PEFT prefix-tuning ``PeftModel`` on the fused path, with each of
    its prefix-tuning adapters in ``model.prefix_bank`` under the adapter's name.

    ``trainable=True``: every adapter becomes a trainable prefix (:func:`prefix_tuning`)
    initialised from PEFT's prompt encoder, MLP reparameterisation included (an adapter loaded
    from disk has none: PEFT saves the folded K/V, which then train as a plain prefix), so
    training goes on where PEFT left off, now with gradient checkpointing and a prefix per row;
    base modules PEFT trains (``modules_to_save``: a classification head) are trainable too,
    also when PEFT loaded the adapter from disk (for inference, so frozen);
    ``trainable=False``: plain K/V entries (PEFT's ``prompt_embeddings``), for serving. Such a
    module is taken out of PEFT's wrapper: the adapter's copy takes its place, so the model's
    state dict (``save_pretrained``, a Trainer checkpoint) holds it under its own name. The
    PEFT model's prompt encoders are copied, not shared: use the returned model from here on.
    """
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise TypeError(f"from_peft expects a peft.PeftModel with prefix-tuning adapters, got "
                        f"{type(peft_model).__name__}")
    for name, cfg in configs.items():
        kind = str(getattr(cfg, "peft_type", None))
        if not kind.endswith("PREFIX_TUNING"):
            raise ValueError(f"adapter {name!r} is {kind}, not a prefix-tuning adapter")
    encoders = peft_model.prompt_encoder
    model = peft_model.get_base_model()
    _one_head_for_all(model, list(configs))
    # base parameters that train under PEFT (a head in training mode) stay trainable
    keep = [p for p in model.parameters() if p.requires_grad] if trainable else []
    bank = PrefixBank.attach(model)
    dims = (bank.num_layers, bank.num_kv_heads, bank.head_dim)
    modules = {}
    for name, cfg in configs.items():  # every adapter read before the model is changed
        encoder = encoders[name]
        # PEFT builds the MLP only for training (prefix_projection and not inference_mode): an
        # adapter loaded from disk holds the folded prompt_embeddings whatever its config says
        transform = getattr(encoder, "transform", None)
        hidden = cfg.encoder_hidden_size if isinstance(transform, nn.Module) else None
        with torch.inference_mode(False):  # parameters, not inference tensors
            module = PrefixParameters(*dims, cfg.num_virtual_tokens, hidden, device=bank.device)
            if any(p.dtype == torch.float64 for p in encoder.parameters()):
                module.double()  # a float64 encoder goes on in float64, not rounded to float32
            module.load_state_dict(encoder.state_dict())  # PEFT's PrefixEncoder names
        modules[name] = module
    taken = [name for name in modules if name in bank]
    if taken:
        raise ValueError(f"the bank already has prefixes named {taken}; from_peft adds each "
                         f"adapter under its own name (was from_peft already called on this "
                         f"model? its adapters are then in model.prefix_bank)")
    warn_window_vs_peft(model, "from_peft")
    swaps = _unwrap_modules_to_save(model)
    try:
        add_prefixes(model, bank, modules, trainable)
    except BaseException:  # PEFT's wrappers back: a retry finds (and unfreezes) the heads again
        for parent, leaf, wrapper, _ in swaps:
            setattr(parent, leaf, wrapper)
        raise
    heads = [head for *_, head in swaps]
    for p in keep + [p for head in heads for p in head.parameters()] if trainable else ():
        p.requires_grad_(True)  # a head trains with the prefix, as under PEFT (loaded one too)
    return model


def _unwrap_modules_to_save(model: nn.Module) -> list:
    """Put in place of each of PEFT's ``modules_to_save`` wrappers (a classification head) the
    copy its forward runs (the active adapter's; the original when none is active or adapters
    are disabled), and return ``(parent, name, wrapper, copy)`` of each (to put back). Left wrapped, a checkpoint of the returned model
    saved the head as ``...modules_to_save.<adapter>.*`` and a model loaded from it got a new,
    random head; and a head PEFT loaded for inference stayed frozen."""
    wrapped = [(path, m) for path, m in model.named_modules()
               if isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict)
               and isinstance(getattr(m, "original_module", None), nn.Module)]
    swaps = []
    for path, m in wrapped:
        active = [a for a in getattr(m, "active_adapters", []) if a in m.modules_to_save]
        head = m.original_module if getattr(m, "disable_adapters", False) or not active \
            else m.modules_to_save[active[0]]
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, head)
        swaps.append((owner, leaf, m, head))
    return swaps


def add_prefixes(model: nn.Module, bank: PrefixBank, modules: dict, trainable: bool) -> None:
    """Add ``{name: PrefixParameters}`` to ``bank``: as trainable prefixes (the base frozen, as
    :func:`prefix_tuning` does), or as fixed K/V entries (``trainable=False``, for serving)."""
    added, frozen = [], getattr(bank, "_base_frozen", False)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name, module in modules.items():
            if trainable:
                _add_trainable(model, bank, name, module)
            else:
                _use_fused_attention(model)
                with torch.no_grad():
                    kv = module()
                bank.add(name, kv[:, 0], kv[:, 1])
            added.append(name)
    except BaseException:  # all or none (an interrupt half-way): a retry finds none of them
        for name in added:
            bank.remove(name)
        for p, wanted in grads:
            p.requires_grad_(wanted)
        bank._base_frozen = frozen
        raise


def _one_head_for_all(model: nn.Module, adapters: list) -> None:
    """Refuse adapters that each keep their own copy of a base module (PEFT's
    ``modules_to_save``: a classification head per task): the returned model routes every row
    through the active adapter's copy, so the other prefixes would run with a head not theirs."""
    for path, m in model.named_modules():
        copies = getattr(m, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict):
            owners = [a for a in adapters if a in copies]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each train their own copy of {path!r} (PEFT's "
                    f"modules_to_save), and one model runs one copy for every row: prefixes of "
                    f"different adapters would share a head that is not theirs. Take the "
                    f"adapters over one per model (PeftModel.from_pretrained(base, adapter_dir)), "
                    f"or drop the others first (peft_model.delete_adapter(name))")


def trainable_parameters(model: nn.Module) -> list:
    """The parameters of ``model`` that require grad (the prefixes after ``prefix_tuning``)."""
    return [p for p in model.parameters() if p.requires_grad]


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts, as PEFT's ``get_nb_trainable_parameters``
    (bitsandbytes' packed 4-bit weights and ZeRO-3's partitioned ones counted as PEFT does)."""
    total = sum(_values_held(p) for p in model.parameters())
    train = sum(_values_held(p) for p in trainable_parameters(model))
    return train, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) the trainable / total parameter counts, as PEFT's method of that name
    (the numbers of :func:`get_nb_trainable_parameters`)."""
    train, total = get_nb_trainable_parameters(model)
    line = (f"trainable params: {train:,} || all params: {total:,} || "
            f"trainable%: {100 * train / max(total, 1):.4f}")
    print(line)
    return line


def _values_held(p: torch.Tensor) -> int:
    """The values ``p`` holds, as PEFT counts them: its elements; DeepSpeed ZeRO-3's count for a
    weight partitioned away (0 elements here); for bitsandbytes' ``Params4bit`` (two 4-bit
    values a byte) the bytes of its storage times two."""
    n = p.numel() or getattr(p, "ds_numel", 0)
    return n * 2 * p.element_size() if type(p).__name__ == "Params4bit" else n


def unload(model: nn.Module, attn_implementation: Optional[str] = None) -> nn.Module:
    """The plain model back, as PEFT's ``unload``: the prefix bank (and its trainable prefixes)
    removed, the ``prefixes=`` hooks taken off and the attention implementation set to
    ``attn_implementation`` when given, else, if the model is on ``"prefix_attn"``, to ``"sdpa"``
    (``"eager"`` for models without an sdpa path, such as soft-capped Gemma 2); the base
    weights are untouched, so ``model(...)`` then gives the base model's logits. The
    implementation is set first: a model that refuses the one asked for raises with nothing
    removed. Save the prefixes first if you need them (``bank.save`` / ``bank.save_peft``).
    Returns ``model``. On a wrapper of the model holding the bank (a PeftModel whose base model
    has it), the base model is unloaded."""
    if "prefix_bank" not in getattr(model, "_modules", {}):
        bank = next((m for m in model.modules() if isinstance(m, PrefixBank)), None)
        owner = bank.model if bank is not None else None
        if owner is not None and owner is not model:
            unload(owner, attn_implementation)
            return model
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    elif hf.attn_implementation(model) == ATTN_NAME:
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:  # "does not support ... scaled_dot_product_attention"
            model.set_attn_implementation("eager")
    hooks = model.__dict__.pop("_prefix_attn_hooks", None)
    for h in hooks or ():
        h.remove()
    if "prefix_bank" in getattr(model, "_modules", {}):
        del model.prefix_bank
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing of a transformers model under either name:
    ``activation_checkpointing_enable`` (newer transformers, which deprecate the old name) or
    ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
