"""``prefixes=`` on a model's forward: the pre-hook turns it into a
:class:`~prefix_attn.bank.PrefixSelection` (outside any compiled graph), shifts the position
ids past each row's prefix and finds packed sequences; the post-hook checks that the
attention function read the selection."""
from __future__ import annotations

import copy
import inspect
import warnings
import weakref

import torch

from .. import distributed
from ..packed import segments as packed_segments
from ..packed import sequence_ids
from .mask import packed_from_positions
from .names import ATTN_NAME, PREFIXES_KWARG, SELECTION_KWARG
from .positions import _cache_length, _check_positions, _pads_inside_the_table, _positions_after_prefix
from .support import attn_implementation

# forward function -> its parameter names (inspect.signature costs ~0.1 ms: once per function,
# not once per decode step); weakly keyed, so a per-instance wrapper does not pin its model
_FORWARD_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forward_params(model) -> list:
    """The parameter names of ``model.forward``, read once per forward function (also what
    prefix-attn serve's scoring asks: whether the model takes ``logits_to_keep``)."""
    forward = model.forward
    func = getattr(forward, "__func__", forward)
    try:
        names = _FORWARD_PARAMS.get(func)
    except TypeError:  # not weak-referenceable: no cache
        return _params(model, forward)
    if names is None:
        names = _FORWARD_PARAMS[func] = _params(model, forward)
    return names


def _params(model, forward) -> list:
    """A forward replaced on the instance by a wrapper taking ``*args`` / ``**kwargs`` that does
    not say what it wraps (no ``functools.wraps``): the class's forward, which it passes them
    to (read as the wrapper's, "position_ids" was not taken: positions not shifted past a prefix)."""
    params = inspect.signature(forward).parameters
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds or (inspect.Parameter.VAR_KEYWORD in kinds and len(params) <= 2):
        own = getattr(type(model), "forward", None)
        if own is not None and getattr(forward, "__func__", None) is not own:
            return list(inspect.signature(own).parameters)[1:]  # without self
    return list(params)


def cache_kwarg(model) -> str:
    """Name of the KV-cache keyword of ``model.forward``: ``"cache"`` (transformers >= 5.2x)
    or ``"past_key_values"`` (earlier 5.x). An unknown keyword would be swallowed by
    ``**kwargs`` and the cache silently ignored, so callers pass ``{cache_kwarg(m): cache}``."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _batch_and_length(kwargs):
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if t is not None:
            return t.shape[0], t.shape[1], t.device
    raise ValueError("prefixes= needs input_ids or inputs_embeds")


def _from_numpy(prefixes):
    """A numpy array of ids (or names) as a list (a 0-d one as its value); anything else as is."""
    if type(prefixes).__module__ == "numpy" and hasattr(prefixes, "tolist"):
        return prefixes.tolist()
    return prefixes


def _rows_for(prefixes):
    """Normalise ``prefixes`` for ``bank.select``: "" -> None (a name per row, or one name)."""
    if isinstance(prefixes, (list, tuple)):
        return [None if isinstance(p, str) and p == "" else p for p in prefixes]
    if isinstance(prefixes, str) and prefixes == "":
        return None
    return prefixes


# torch.compile specialises the sizes 0 and 1: a batch in which no row has a prefix (one
# entry of length 0) or whose longest prefix is one position got a prefill and a decode graph
# of its own. Padded to this many zero positions (``prefix_lens`` unchanged: the kernels read
# no key past it), they reuse the graphs of the other batches of their entry count.
_MIN_PREFIX = 2


def _pad_short(sel):
    """``sel``, or for a selection whose longest prefix is under ``_MIN_PREFIX`` positions (and
    that records no autograd: a training step keeps its one graph anyway) a shallow copy whose
    prefix tensor is padded with zeros to it (made once per bank selection and entry version;
    the selection stays as the bank cached it), holding the original as ``_unpadded`` for the
    eager fallback (whose probabilities must show the real prefix columns only)."""
    kv = sel._kv
    if kv.shape[4] >= _MIN_PREFIX or kv.requires_grad:
        return sel
    # rebuilt when the entry changed in place (a view shares its base's version counter;
    # an inference tensor has none: rebuilt every time, a copy of one or two positions)
    stamp = None if kv.is_inference() else kv._version
    cached = getattr(kv, "_prefix_attn_padded", None)
    if cached is not None and stamp is not None and cached[0] == stamp:
        padded = cached[1]
    else:
        padded = kv.new_zeros(*kv.shape[:4], _MIN_PREFIX, kv.shape[5])
        padded[:, :, :, :, :kv.shape[4]] = kv
        kv._prefix_attn_padded = (stamp, padded)
    out = copy.copy(sel)
    out._kv = padded
    out._unpadded = sel
    return out


def _mark_dynamic(sel) -> None:
    """Tell torch.compile that the number of stacked entries and the longest prefix vary from
    batch to batch (a serving mix would otherwise recompile at the first change of each and
    reach dynamo's recompile limit sooner). A no-op outside torch.compile."""
    for t, dim in ((sel._kv, 2), (sel._kv, 4), (sel.prefix_lens, 0)):
        if t.shape[dim] >= 2:  # sizes 0 and 1 are specialised whatever the mark
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _without_cache(model, kwargs) -> bool:
    """Whether this forward runs without a KV cache: none given, and ``use_cache`` (the
    keyword, else the config's) off or turned off by activation checkpointing in training."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    use = kwargs.get("use_cache")
    if use is None:
        use = getattr(getattr(model, "config", None), "use_cache", False)
    if not use:
        return True
    return model.training and torch.is_grad_enabled() and _checkpointing(model)


def _checkpointing(module) -> bool:
    """Whether a layer of ``module`` has activation checkpointing on (the prefix bank's own
    modules skipped: a walk over a thousand trainable prefixes cost ~3 ms a training step)."""
    if getattr(module, "gradient_checkpointing", False):
        return True
    return any(_checkpointing(child) for name, child in module._modules.items()
               if child is not None and name != "prefix_bank")


def _no_packing_search(model, kwargs, B: int, S: int, device) -> None:
    """For a batch whose sequences the hook knows (one a row, or found packed): an all-ones
    mask where there is neither a mask nor a cache, the case where transformers looks for
    packed sequences in the position ids; inside torch.compile it cannot rule them out and
    masks with a packed-sequence function that cannot be read without a graph break."""
    if kwargs.get("attention_mask") is None and _without_cache(model, kwargs):
        kwargs["attention_mask"] = torch.ones(B, S, dtype=torch.bool, device=device)


def _contiguous(position_ids) -> bool:
    """Whether every row of ``position_ids`` counts up by one (transformers' rule for one
    sequence a row). One host read, in place of the one transformers makes for packing; none
    for rows of one position (a decode step of generate, which passes position_ids: always so)."""
    if position_ids.dim() != 2:
        return False
    return position_ids.shape[-1] <= 1 or bool((torch.diff(position_ids, dim=-1) == 1).all())


def _packed_row(prefixes, kwargs, B: int, S: int):
    """``(prefixes, seq_ids)``: for one row packing several sequences under one prefix (no
    mask, no cache content, ``position_ids`` that restart), the prefix repeated per sequence
    and the sequence ids, so the row takes the per-sequence path, found here, outside any
    compiled graph (the attention function cannot read the positions inside one); else
    ``(prefixes, None)``. One host read."""
    rows = prefixes if isinstance(prefixes, (list, tuple)) else [prefixes]
    if B != 1 or len(rows) != 1 or isinstance(rows[0], torch.Tensor) \
            or kwargs.get("attention_mask") is not None or _cache_length(kwargs):
        return prefixes, None
    seq_ids = packed_from_positions(kwargs.get("position_ids"), B, S)
    if seq_ids is None:
        return prefixes, None
    return list(rows) * (int(seq_ids[0, -1]) + 1), seq_ids


def _packed_request(prefixes, position_ids, attention_mask, B: int, S: int):
    """Sequence ids ``[B, S]`` (numbered across the batch, 0..n-1) when ``prefixes`` names one
    prefix per packed sequence: more entries than rows, and ``position_ids`` that restart
    exactly that often; else None. The ids come from the positions before they are shifted by
    the prefixes (a shifted boundary could look contiguous), and the attention function uses
    them instead of finding the sequences itself."""
    if isinstance(prefixes, (list, tuple)):
        count = len(prefixes)
    elif isinstance(prefixes, torch.Tensor) and prefixes.dim() == 1:
        count = prefixes.numel()
    else:
        return None
    if count <= B:
        return None
    wrong = (f"got {count} prefixes for a batch of {B} rows: give one per row, or one per "
             "sequence for rows that pack several sequences without padding (no attention_mask, "
             "position_ids restarting at each sequence, as DataCollatorWithFlattening makes them)")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != S:
        raise ValueError(f"{wrong}; no such position_ids were given")
    if attention_mask is not None and not (attention_mask.dim() == 2 and bool(attention_mask.all())):
        raise ValueError(f"{wrong}; this batch is padded (attention_mask has zeros)")
    local = sequence_ids(position_ids.expand(B, S))
    counts = local[:, -1] + 1  # sequences per row
    seq_ids = local + (counts.cumsum(0) - counts)[:, None]
    n = int(counts.sum())
    if n != count:
        raise ValueError(f"{wrong}; its position_ids restart into {n} sequences")
    return seq_ids


def _pre_hook(model, args, kwargs):
    # traceable when there is nothing to do: a compiled function that calls a model with a bank
    # but without prefixes= keeps one graph (fullgraph=True works)
    if PREFIXES_KWARG not in kwargs and not _may_have_a_default(model):
        if model.training and not torch.compiler.is_compiling() and torch.is_grad_enabled():
            _warn_training_without_prefixes(model)
        return None
    return _prefixes_to_selection(model, args, kwargs)


def _may_have_a_default(model) -> bool:
    """Whether ``model``'s bank ever had a default prefix. Attribute reads, which a compiled
    function calling the model guards on (reads of ``__dict__`` were not guarded: a default
    set after the first call was ignored, silently); the default itself is read outside any
    graph, as a pinned block found it."""
    bank = getattr(model, "prefix_bank", None)
    return bank is not None and bool(getattr(bank, "_had_default", False))


def _trains_prefixes(model) -> bool:
    """Whether this forward trains: the model in training mode, grad on, and a bank with a
    trainable entry whose parameters require grad."""
    bank = getattr(model, "prefix_bank", None)
    return bool(model.training and torch.is_grad_enabled() and bank is not None
                and bank._trains_any())


def _warn_training_without_prefixes(model) -> None:
    """Warn (once per bank) when a training forward has no ``prefixes=`` while the bank has
    trainable entries: no prefix is applied, so they learn nothing (silently, when another
    parameter trains; else backward fails with torch's "does not require grad"). The usual
    cause: a Trainer whose collator or ``remove_unused_columns`` dropped the column."""
    bank = getattr(model, "prefix_bank", None)
    if bank is None or getattr(bank, "_warned_no_prefixes", False):
        return
    names = bank._trained_names()
    if not names:
        return
    bank._warned_no_prefixes = True
    warnings.warn(
        f"prefix_attn: a training forward without prefixes=: no prefix is applied, so the "
        f"trainable prefix{'es' if len(names) > 1 else ''} {', '.join(map(repr, names))} "
        f"learn{'' if len(names) > 1 else 's'} nothing from it. Pass prefixes= (a name or "
        f"bank id per row, or one for all rows; prefixes=None for none), or set "
        f"model.prefix_bank.default_prefix to the name to apply it to every call without "
        f"prefixes= (a trainer that cannot pass it). With transformers' Trainer keep the column: "
        f"remove_unused_columns=False, and a collator that keeps it (default_data_collator "
        f"drops string fields: give bank ids, or collate the names yourself)",
        stacklevel=3)


# forward keywords that carry image, video or audio inputs (or their placement: Qwen2-VL's
# image_grid_thw with merged inputs_embeds)
_MEDIA_KEYS = ("pixel_values", "input_features", "input_values", "image_", "video_", "audio_")


@torch.compiler.disable
def _prefixes_to_selection(model, args, kwargs):
    """The pre-hook's work: ``prefixes=`` -> a :class:`PrefixSelection` in the kwargs, position
    ids shifted past the prefixes, packed sequences found (outside any graph). Arguments given
    by position are read by name and given back by position (a user's hook reads ``args[0]``)."""
    if not args:
        return _to_selection(model, args, kwargs)
    names = forward_params(model)[:len(args)]
    args, kwargs = _to_selection(model, (), {**kwargs, **dict(zip(names, args))})
    return tuple(kwargs.pop(n) for n in names), kwargs


def _to_selection(model, args, kwargs):
    if PREFIXES_KWARG in kwargs:
        prefixes = _from_numpy(kwargs.pop(PREFIXES_KWARG))
    else:  # the bank's default prefix, as a pinned block (a generate call) found it
        prefixes = model.prefix_bank._default_in_call()
        if prefixes is None:
            if model.training and torch.is_grad_enabled():
                _warn_training_without_prefixes(model)
            return args, kwargs
    if prefixes is None and not _trains_prefixes(model):
        return args, kwargs  # no prefix (a training forward goes on: its loss keeps a graph)
    impl = attn_implementation(model)
    if impl != ATTN_NAME:
        raise ValueError(f"prefixes= needs attn_implementation={ATTN_NAME!r}; this model uses "
                         f"{impl!r} (call model.set_attn_implementation({ATTN_NAME!r}))")
    media = sorted(k for k, v in kwargs.items() if v is not None and k.startswith(_MEDIA_KEYS))
    if media:
        raise NotImplementedError(
            f"prefixes= with {', '.join(media)}: the positions of image, video and audio tokens "
            "(M-RoPE and the like) are not shifted past a prefix yet; text-only inputs work")
    bank = getattr(model, "prefix_bank", None)
    if bank is None:
        raise ValueError(f"prefixes= on a {type(model).__name__} whose prefix bank was removed: "
                         "attach one again (prefix_attn.PrefixBank.attach(model))")
    B, S, device = _batch_and_length(kwargs)
    given_positions = kwargs.get("position_ids")
    seq_ids = _packed_request(prefixes, given_positions, kwargs.get("attention_mask"), B, S)
    one_row = seq_ids is None
    if one_row:
        prefixes, seq_ids = _packed_row(prefixes, kwargs, B, S)
    if seq_ids is not None:  # one prefix per packed sequence
        sel = bank.select(prefixes, len(prefixes), device=device)
        sel.packed_seq_ids = seq_ids.to(device)
        if one_row:  # the row's one prefix, repeated per sequence: the fallback takes it per row
            sel.packed_row_ids = sel.prefix_ids[:1]
        # the regrouping's index tensors, found here (host syncs) rather than in every layer,
        # where a compiled forward would break its graph for them
        sel.packed_segments = packed_segments(sel.packed_seq_ids)
        row_lens = sel.row_lens.to(device)
        kwargs["position_ids"] = kwargs["position_ids"].expand(B, S) + row_lens[sel.packed_seq_ids]
        _check_positions(model, S, kwargs, max(sel.host_row_lens, default=0))
        _no_packing_search(model, kwargs, B, S, device)  # the sequences are known
    else:
        sel = _pad_short(bank.select(_rows_for(prefixes), B, device=device))
        row_lens = sel.row_lens.to(device)
        if "position_ids" in forward_params(model) and any(sel.host_row_lens):
            pos = _positions_after_prefix(model, kwargs, S, row_lens, device,
                                          uniform=len(set(sel.host_row_lens)) == 1)
            if pos is not None:
                kwargs["position_ids"] = _pads_inside_the_table(model, kwargs, S, pos,
                                                                max(sel.host_row_lens))
                _check_positions(model, S, kwargs, max(sel.host_row_lens))
                if given_positions is None or _contiguous(given_positions):
                    _no_packing_search(model, kwargs, B, S, device)  # one sequence a row
    _mark_dynamic(sel)
    kwargs[SELECTION_KWARG] = sel
    if not _warned_reentrant and model.training and sel._kv.requires_grad:
        _check_reentrant_data_parallel(model)
    return args, kwargs


_warned_reentrant = False


def _check_reentrant_data_parallel(model) -> None:
    """Warn (once) when a trained prefix meets reentrant checkpointing in a multi-process run:
    every checkpointed layer runs its own backward into the prefix's parameters, and
    DistributedDataParallel without ``static_graph`` syncs only the first of those gradients."""
    global _warned_reentrant
    if torch.compiler.is_compiling() or distributed.world_size() == 1 \
            or not distributed.reentrant_checkpointing(model):
        return
    _warned_reentrant = True
    warnings.warn(
        "prefix_attn: a trained prefix with reentrant activation checkpointing "
        "(use_reentrant=True) in a multi-process run: every layer's backward adds to the "
        "prefix's gradient separately, and DistributedDataParallel without static_graph=True "
        "either fails in the backward ('Expected to mark a variable ready only once') or "
        "syncs only part of the gradient (wrong gradients, no error). Use use_reentrant=False "
        "(transformers' default) or DistributedDataParallel(..., static_graph=True)",
        stacklevel=3)


def _post_hook(model, args, kwargs, output):
    if SELECTION_KWARG not in kwargs:  # no prefixes= in this forward (traceable, as above)
        return None
    return _check_selection_read(model, kwargs[SELECTION_KWARG], output, _in_compiled_call())


def _in_compiled_call() -> bool:
    """Whether this hook runs inside a call to a torch.compile'd module or function (whose
    graphs do not mark the selection read); True where torch cannot tell."""
    if torch.compiler.is_compiling():  # traced inline: dynamo must not reach the call below
        return True
    callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    callback = getattr(callback, "get_eval_frame_callback", None)
    return callback is None or callback() is not None


def _has_compiled_forward(model) -> bool:
    """Whether ``model`` or a submodule runs a compiled forward of its own
    (``m.forward = torch.compile(m.forward)``, ``m.compile()``)."""
    return any(getattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable", None) is not None
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


@torch.compiler.disable
def _check_selection_read(model, sel, output, in_compiled_call: bool):
    """The forward's own selection (from its kwargs: nothing kept between the hooks, so a
    forward interrupted by a BaseException leaves nothing behind) was read by its attention;
    a compiled forward is not judged (inside a graph the attention function cannot mark it)."""
    used = getattr(sel, "_read_by_attention", False)
    if not used and output is not None and any(sel.host_row_lens) and not in_compiled_call \
            and not _has_compiled_forward(model):
        skipped = sorted(getattr(sel, "_skipped_modules", ()))
        why = (f"its attention modules ({', '.join(skipped)}) have no layer index"
               if skipped else "its forward does not forward **kwargs to attention?")
        raise RuntimeError(
            f"{type(model).__name__} did not pass the prefix selection down to its attention "
            f"function ({why}); the prefixes were not applied")
    return None


# torch.compile(model) runs the hooks outside its graph: they are never compiled as frames of
# their own (tracing _pre_hook there would break the graph at its disabled body); a compiled
# function that calls the model inlines them, and without prefixes= they add nothing
_skip_code = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
for _hook in (_pre_hook, _post_hook) if _skip_code is not None else ():
    _skip_code(_hook.__code__)


def install_hooks(model) -> None:
    """Register the ``prefixes=`` pre-hook and its check on ``model`` (idempotent)."""
    if getattr(model, "_prefix_attn_hooks", None) is not None:
        return
    h1 = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    h2 = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model._prefix_attn_hooks = (h1, h2)
