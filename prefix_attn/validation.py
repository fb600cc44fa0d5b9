"""Input checks shared by every backend, and the normalised argument record they produce.

`normalize` is the only place that interprets the public arguments of
`prefix_attention`; backends receive an `AttnArgs` whose fields always have the same
form (see docs/INTERNALS.md).
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttnArgs:
    """Normalised arguments.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D]; prefix_k, prefix_v: [N, Hkv, P, D]
    (an empty [1, Hkv, 0, D] when there is no prefix); prefix_ids: int64 [B];
    prefix_lens: int64 [N]; key_padding_mask: bool [B, Skv] or None;
    window: -1 for none; softcap: 0.0 for none.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    prefix_ids: torch.Tensor
    prefix_lens: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    causal: bool
    scale: float
    window: int
    softcap: float

    @property
    def dims(self):
        """(B, Hq, Hkv, Sq, Skv, N, P, D)."""
        B, Hq, Sq, D = self.q.shape
        N, Hkv, P, _ = self.prefix_k.shape
        return B, Hq, Hkv, Sq, self.k.shape[2], N, P, D

    def op_args(self):
        """Positional arguments of every backend's fwd op (the schema in docs/INTERNALS.md)."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.prefix_ids,
                self.prefix_lens, self.key_padding_mask, self.causal, self.scale,
                self.window, self.softcap)


def _shape(t) -> str:
    return "None" if t is None else str(list(t.shape))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels take explicit strides but need unit stride along D; copy only when it is not.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# Windows above this are "no window" in effect and would overflow the ops' int64 argument.
_MAX_WINDOW = 2 ** 62


def _flag(name: str, value) -> bool:
    """A Python bool, or a numpy one (``np.bool_``), as a bool."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(value, "dtype", None) == bool \
            and getattr(value, "shape", None) == ():
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__module__}.{type(value).__qualname__}")


def int_at_least(value, minimum: int, what: str) -> int:
    """``value`` as an int (numpy integers and one-element integer tensors too) that is at
    least ``minimum``; a ValueError naming ``what`` otherwise (bools, floats and strings
    included)."""
    need = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be {need}, got {value!r}") from None
    if index < minimum:
        raise ValueError(f"{what} must be {need}, got {index}")
    return index


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def _finite_float(name: str, value, what: str) -> float:
    """A real number (Python or numpy) as a finite float; a symbolic one under torch.compile
    (the default scale of a dynamic head dim, D ** -0.5) goes to the ops as it is (whose float
    argument then specialises the graph on the head dim: one graph per head dim)."""
    if type(value) is float and -math.inf < value < math.inf:  # the common case, first
        return value
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    value = float(value)
    # comparisons, not math.isfinite: while dynamo traces, a symbolic value passes for a float
    if not -math.inf < value < math.inf:
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return value


def _compiling() -> bool:
    # Range checks read tensor values (a host sync and a graph break under torch.compile);
    # compiled graphs check on the device instead (_assert_in_range).
    return torch.compiler.is_compiling()


def _assert_in_range(t: torch.Tensor, lo: int, hi: int, message: str) -> None:
    """Inside a compiled graph: an asynchronous device-side check that ``lo <= t <= hi`` (a
    RuntimeError with ``message`` on CPU, a device assert on CUDA), so that an out-of-range
    id or length never reaches a kernel as an out-of-bounds read."""
    if t.numel() > 0:
        torch._assert_async(((t >= lo) & (t <= hi)).all(), message)


# (min, max) of device index tensors already read, keyed weakly by the tensor and checked
# against its version counter and data pointer: an HF forward passes the same prefix_ids /
# prefix_lens to every layer, and reading them is a host sync on GPU, so each is read once per
# forward instead of per layer. CPU tensors are never cached: reading them is cheap, and their
# values are easily rewritten without a version bump (through .numpy(), .data, a from_numpy
# buffer refilled in numpy, DLPack), which would let a stale range pass an out-of-range id.
_RANGES = WeakIdKeyDictionary()


# Index tensors built from host values (a bank selection's prefix_ids / prefix_lens, made
# from Python ints) carry the range they were built with, as an attribute: read without any
# device access, in every layer and under inference mode too (whose tensors have no version
# counter for _RANGES). Stamped with the data pointer (and version, where there is one): a
# tensor changed since is read again.
_KNOWN_ATTR = "_prefix_attn_known_range"


def _stamp(t: torch.Tensor) -> tuple:
    return t.data_ptr(), None if t.is_inference() else t._version


def known_range(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Record that the index tensor ``t``, just built from host values, lies in [lo, hi]
    (``normalize`` then checks those bounds without reading ``t``). Returns ``t``. Not for
    the fake tensors of a trace (torch.export): no data to stamp; graphs check on the device."""
    if not is_fake(t):
        setattr(t, _KNOWN_ATTR, (_stamp(t), int(lo), int(hi)))
    return t


def _known(t: torch.Tensor) -> Optional[tuple]:
    hit = getattr(t, _KNOWN_ATTR, None)
    # (fake tensors are never stamped: known_range skips them)
    return hit if hit is not None and hit[0] == _stamp(t) else None


def inherit_range(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t`` gathered from ``source`` (a subset of its values): ``source``'s known range, if any."""
    hit = _known(source)
    if hit is not None:
        known_range(t, hit[1], hit[2])
    return t


def _vmapped(t: torch.Tensor) -> bool:
    """Whether torch.vmap maps over ``t`` at any level (functionalize and grad wrap tensors too,
    and read their values fine)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _value_range(t: torch.Tensor, name: str) -> tuple:
    """(min, max) of a non-empty integer tensor (None, None on the meta device: no values)."""
    known = _known(t)
    if known is not None:
        return known[1], known[2]
    if t.device.type == "meta":
        return None, None
    if _vmapped(t):
        raise TypeError(f"{name} cannot be mapped over by torch.vmap (its values are range-checked "
                        f"on the host before anything reads with them): map over q, k, v, "
                        f"prefix_k, prefix_v or key_padding_mask, or loop")
    cache = t.device.type != "cpu" and not t.requires_grad and not torch.is_inference(t)
    if cache:
        hit = _RANGES.get(t)
        if hit is not None and hit[0] == t._version and hit[1] == t.data_ptr():
            return hit[2], hit[3]
    lo, hi = int(t.min()), int(t.max())
    if cache:
        _RANGES[t] = (t._version, t.data_ptr(), lo, hi)
    return lo, hi


def _check_tensor(name, t, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_dense(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {_shape(t)}")


def _check_dense(name, t) -> None:
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}: pad ragged rows "
                        f"and pass key_padding_mask, or .to_dense() a sparse one")


def _check_index_tensor(name, t, length, device, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [{length}], "
                        f"got {type(t).__name__}")
    _check_dense(name, t)
    dtype = t.dtype
    if dtype is not torch.int64 and (dtype.is_floating_point or dtype.is_complex
                                     or dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}] ({what}), got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t if dtype is torch.int64 else t.to(torch.int64)


# The stand-ins of "no prefix" (an empty [1, Hkv, 0, D] bank, ids zeros [B], lens [0]) per
# (device, dtype, B, Hkv, D, inference mode): an HF forward without a prefix asks for the same
# ones in every layer of every step, and three allocations cost more than its checks. Nothing
# writes them (the ops take them as inputs; the empty bank has no element to write). Few keys
# (one per batch size seen), so a plain dict, emptied past _NO_PREFIX_MAX.
_NO_PREFIX: dict = {}
_NO_PREFIX_MAX = 64


def _no_prefix(q: torch.Tensor, B: int, Hkv: int, D: int) -> tuple:
    """(empty bank, prefix_ids, prefix_lens) of a call without a prefix. Made afresh, never
    cached, while tracing (torch.compile, torch.jit.trace: ops the graph keeps) and for a q
    of a tensor subclass (fake, functional, DTensor), on the meta device or functorch-wrapped,
    whose tensors must not outlive the call."""
    cacheable = type(q) is torch.Tensor and not _compiling() and not torch.jit.is_tracing() \
        and q.device.type != "meta" and not torch._C._functorch.is_functorch_wrapped_tensor(q) \
        and type(B) is int and type(Hkv) is int and type(D) is int
    key = (q.device, q.dtype, B, Hkv, D, torch.is_inference_mode_enabled()) if cacheable else None
    hit = _NO_PREFIX.get(key) if cacheable else None
    if hit is not None:
        return hit
    made = (q.new_zeros((1, Hkv, 0, D)), torch.zeros(B, dtype=torch.int64, device=q.device),
            torch.zeros(1, dtype=torch.int64, device=q.device))
    if cacheable:
        if len(_NO_PREFIX) >= _NO_PREFIX_MAX:
            _NO_PREFIX.clear()
        _NO_PREFIX[key] = made
    return made


def normalize(q, k, v, prefix_k=None, prefix_v=None, *, prefix_ids=None, prefix_lens=None,
              key_padding_mask=None, causal=True, scale=None, window=None, softcap=None,
              ) -> AttnArgs:
    """Validate the public arguments of `prefix_attention` and return `AttnArgs`.

    Raises ValueError/TypeError naming the argument and the shapes seen.
    """
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size of k ({Bk}) differs from q ({B}): q {_shape(q)}, k {_shape(k)}")
    if Dk != D:
        raise ValueError(f"head dim of k ({Dk}) differs from q ({D}): q {_shape(q)}, k {_shape(k)}")
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D} (q {_shape(q)})")
    if Hq < 1:
        raise ValueError(f"q must have at least one head, got {Hq}: q {_shape(q)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of "
                         f"kv heads ({Hkv}): q {_shape(q)}, k {_shape(k)}")
    dtype, device = q.dtype, q.device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has unsupported dtype {dtype}; use float16, bfloat16 or float32 "
                        f"(float64: the torch backend and the reference only)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}: all inputs must share one dtype")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")

    # -- prefix bank -------------------------------------------------------------------
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(f"prefix_k and prefix_v must be given together, got prefix_k "
                         f"{_shape(prefix_k)} and prefix_v {_shape(prefix_v)}")
    if prefix_k is None:
        for name, given in (("prefix_ids", prefix_ids), ("prefix_lens", prefix_lens)):
            if given is not None:
                raise ValueError(f"{name} given without prefix_k/prefix_v")
        prefix_k, no_ids, no_lens = _no_prefix(q, B, Hkv, D)
        prefix_v = prefix_k
    else:
        no_ids = no_lens = None
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            _check_dense(name, t)
            if t.dim() not in (3, 4):
                raise ValueError(f"{name} must be [N, Hkv, P, D] or [Hkv, P, D], got {_shape(t)}")
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}: all inputs must share one dtype")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k and prefix_v must have the same shape, got "
                             f"{_shape(prefix_k)} and {_shape(prefix_v)}")
        if prefix_k.dim() == 3:
            prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
        N, Hp, P, Dp = prefix_k.shape
        if Hp != Hkv or Dp != D:
            raise ValueError(f"prefix_k must be [N, {Hkv}, P, {D}] to match k {_shape(k)}, "
                             f"got {_shape(prefix_k)}")
        if N < 1:
            raise ValueError(f"the prefix bank is empty: prefix_k {_shape(prefix_k)}")
    N, _, P, _ = prefix_k.shape
    compiling = _compiling()

    if prefix_ids is None:
        if N != 1:
            raise ValueError(f"prefix_ids is required when the bank holds N={N} > 1 prefixes "
                             f"(prefix_k {_shape(prefix_k)})")
        prefix_ids = no_ids if no_ids is not None else torch.zeros(B, dtype=torch.int64, device=device)
    else:
        prefix_ids = _check_index_tensor("prefix_ids", prefix_ids, B, device, "one entry per batch row")
        if compiling:  # a constant message: symbolic shapes cannot be formatted in a graph
            _assert_in_range(prefix_ids, 0, N - 1, "prefix_ids must lie in [0, N) for a bank of N "
                                                   "entries (prefix_k [N, Hkv, P, D])")
        elif B > 0:
            lo, hi = _value_range(prefix_ids, "prefix_ids")
            if lo is not None and (lo < 0 or hi >= N):
                raise ValueError(f"prefix_ids must lie in [0, {N}) for a bank of N={N} (prefix_k "
                                 f"{_shape(prefix_k)}), got values in [{lo}, {hi}]")
    if prefix_lens is None:
        prefix_lens = no_lens if no_lens is not None else \
            torch.full((N,), P, dtype=torch.int64, device=device)
    else:
        prefix_lens = _check_index_tensor("prefix_lens", prefix_lens, N, device, "one length per bank entry")
        if compiling:
            _assert_in_range(prefix_lens, 0, P, "prefix_lens must lie in [0, P] (prefix_k "
                                                "[N, Hkv, P, D])")
        else:
            lo, hi = (0, P) if N == 0 else _value_range(prefix_lens, "prefix_lens")
            if lo is not None and (lo < 0 or hi > P):
                raise ValueError(f"prefix_lens must lie in [0, P={P}] (prefix_k {_shape(prefix_k)}), "
                                 f"got values in [{lo}, {hi}]")

    # -- masks and scalars -------------------------------------------------------------
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor [B, Skv], got "
                            f"{type(key_padding_mask).__name__}")
        _check_dense("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token), "
                            f"got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Skv):
            raise ValueError(f"key_padding_mask must have shape [B, Skv] = [{B}, {Skv}], "
                             f"got {_shape(key_padding_mask)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {device}")
        key_padding_mask = key_padding_mask.contiguous()
    causal = _flag("causal", causal)
    if scale is None and isinstance(D, torch.Tensor):  # a shape read by torch.jit.trace
        D = int(D)
    scale = _finite_float("scale", D ** -0.5 if scale is None else scale, "a finite float")
    if not _FLOAT32_MAX >= scale >= -_FLOAT32_MAX:  # the kernels take it as a float32
        raise ValueError(f"scale must be finite in float32 (|scale| <= {_FLOAT32_MAX:.3g}), got {scale}")
    if window is None:
        window = -1
    else:
        if isinstance(window, (bool, torch.Tensor)) or not isinstance(window, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"window must be an int or None, got {window!r}")
        window = int(window)
        if window <= 0 or window > _MAX_WINDOW:
            raise ValueError(f"window must be a positive int (at most 2**62) or None, got {window}")
    if softcap is None:
        softcap = 0.0
    else:
        softcap = _finite_float("softcap", softcap, "a finite float or None")
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {softcap}")
        # the kernels take softcap and scale / softcap as float32: a softcap that rounds to 0
        # there read as "no softcap", and an infinite ratio gave NaN gradients (0 * inf)
        if not _FLOAT32_TINY <= softcap <= _FLOAT32_MAX or not abs(scale) / softcap <= _FLOAT32_MAX:
            raise ValueError(f"softcap must be a normal float32 with scale / softcap finite in "
                             f"float32, got softcap {softcap} (scale {scale})")

    return AttnArgs(
        q=_last_dim_contiguous(q), k=_last_dim_contiguous(k), v=_last_dim_contiguous(v),
        prefix_k=_last_dim_contiguous(prefix_k), prefix_v=_last_dim_contiguous(prefix_v),
        prefix_ids=prefix_ids.contiguous(), prefix_lens=prefix_lens.contiguous(),
        key_padding_mask=key_padding_mask, causal=causal, scale=scale,
        window=window, softcap=softcap,
    )
