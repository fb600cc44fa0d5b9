"""Backend registry and selection.

A backend is a pair of torch ops (fwd, bwd) with one schema (docs/INTERNALS.md). Backend
modules register themselves when imported, inside try/except so that a missing or broken optional backend (no triton, no compiled extension) never breaks
`import prefix_attn`. They are imported once, by `import prefix_attn`; none touches CUDA.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .autograd import register_autograd
from .validation import AttnArgs

ENV_BACKEND = "PREFIX_ATTN_BACKEND"
BACKEND_NAMES = ("triton", "cuda", "cpu", "torch")
# Modules that define backends; each calls register_backend at import.
_BACKEND_MODULES = ("prefix_attn.torch_backend", "prefix_attn.cpp_backend",
                    "prefix_attn.triton_backend")


class AnyDevice(tuple):
    """``Backend.devices`` of a backend that takes tensors of every device type (the torch
    composite: DESIGN.md's "anywhere"); ``"mps" in AnyDevice()`` is True."""

    def __new__(cls):
        return super().__new__(cls, ("any device",))

    def __contains__(self, device_type) -> bool:
        return True


@dataclass
class Backend:
    name: str
    fwd: Callable
    bwd: Callable
    devices: Tuple[str, ...]
    priority: int
    is_available: Callable[[], bool] = lambda: True
    unsupported: Callable[[AttnArgs], Optional[str]] = lambda args: None
    description: str = ""
    needs: str = ""  # what is_available() waits for, said when the backend is asked for without it
    # fwd's implementation as a plain Python function (same arguments and results), for calls
    # the dispatcher would pass straight to it (api._run); None: always through fwd
    direct_fwd: Optional[Callable] = None


_REGISTRY: Dict[str, Backend] = {}
_LOAD_ERRORS: Dict[str, str] = {}
_loaded = False


def register_backend(backend: Backend) -> None:
    register_autograd(backend.fwd, backend.bwd)
    _REGISTRY[backend.name] = backend
    _AVAILABLE.clear()


def load_backends() -> None:
    """Import every backend module once (idempotent, never raises)."""
    _load_all()
    # filled now, not at the first attention call: a first call inside torch.compile would
    # write it while tracing, and the guard on it would recompile the graph at the second
    available_backends()


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but something it needs is missing
                _LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"
        except Exception as e:  # a broken optional backend must not break the package
            _LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"


def load_errors() -> Dict[str, str]:
    """Why optional backend modules failed to load (module -> error)."""
    _load_all()
    return dict(_LOAD_ERRORS)


def _safe_available(b: Backend) -> bool:
    try:
        return bool(b.is_available())
    except Exception:
        return False


# available_backends() per TRITON_INTERPRET value (cleared when a backend registers):
# availability is fixed once the modules are loaded (an extension built or not, CUDA present or
# not) except for the interpreter switch; asked on every attention call, so not recomputed
_AVAILABLE: Dict[Optional[str], Tuple[str, ...]] = {}


def _available_names() -> Tuple[str, ...]:
    _load_all()
    key = os.environ.get("TRITON_INTERPRET")
    names = _AVAILABLE.get(key)
    if names is None:
        live = [b for b in _REGISTRY.values() if _safe_available(b)]
        names = _AVAILABLE[key] = tuple(b.name for b in sorted(live, key=lambda b: -b.priority))
    return names


def available_backends() -> list:
    """Names of the backends usable on this machine, best first."""
    return list(_available_names())


def get_backend(name: str) -> Backend:
    """The backend called `name`, if available (the cached answer of available_backends: this
    runs at every call that names a backend, where is_available() read the environment and,
    for triton on a GPU, asked CUDA)."""
    if name in _available_names():
        return _REGISTRY[name]
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {name!r}")
    if name not in _REGISTRY or not _safe_available(_REGISTRY[name]):
        if name in _REGISTRY and _REGISTRY[name].needs:
            why = f"it needs {_REGISTRY[name].needs}"
        else:
            why = "; ".join(f"{m}: {e}" for m, e in _LOAD_ERRORS.items()) or "not built or not installed"
        raise RuntimeError(f"backend {name!r} is not available on this machine "
                           f"(available: {available_backends()}; {why})")
    return _REGISTRY[name]


# Switches read by the kernels' host code (triton_backend) and the C++ backend, with the values
# they take: any other value is an error naming the variable, not silently the default (raised
# where each is read, on every call; the commands check them all up front: check_env_backend).
SWITCHES = {"PREFIX_ATTN_TRITON_CASCADE": ("auto", "0", "1"),
            "PREFIX_ATTN_CPU_PATH": ("cascade", "rows"),
            "PREFIX_ATTN_CPU_BWD": ("fused", "split")}


def _tiles_ok(value: str) -> bool:
    parts = value.split(",")
    return len(parts) == 4 and all(p.strip().isdigit() and 8 <= int(p) <= 1024 and int(p) % 8 == 0
                                   for p in parts)


def check_switches() -> None:
    """Raise ValueError for a set switch (SWITCHES, PREFIX_ATTN_CPU_TILES) with a value the
    code does not take."""
    env = os.environ
    for name, allowed in SWITCHES.items():
        value = env.get(name)
        if value and value not in allowed:
            raise ValueError(f"environment variable {name}={value!r}: expected one of "
                             f"{', '.join(allowed)} (or unset)")
    tiles = env.get("PREFIX_ATTN_CPU_TILES")
    if tiles and not _tiles_ok(tiles):
        raise ValueError(f"environment variable PREFIX_ATTN_CPU_TILES={tiles!r}: expected four "
                         "comma-separated multiples of 8 in [8, 1024] (fwd_m,fwd_n,bwd_m,bwd_n)")


def check_env_backend(device_type: str, what: str = "the model") -> None:
    """For commands, before any work: $PREFIX_ATTN_BACKEND, when set, names a backend usable
    here on ``device_type`` tensors (else every attention call would fail). ValueError naming
    the variable and the usable values otherwise."""
    check_switches()
    name = os.environ.get(ENV_BACKEND) or None
    if name is None:
        return
    available = available_backends()
    usable = [n for n in available if device_type in get_backend(n).devices]
    fix = f"set {ENV_BACKEND} to one of {', '.join(usable)}, or unset it to choose the best one"
    if name not in BACKEND_NAMES:
        raise ValueError(f"environment variable {ENV_BACKEND}={name!r}: not a backend; the backends "
                         f"are {', '.join(BACKEND_NAMES)}; {fix}")
    if name not in available:
        raise ValueError(f"environment variable {ENV_BACKEND}={name}: that backend is not available "
                         f"on this machine; {fix}")
    if name not in usable:
        raise ValueError(f"environment variable {ENV_BACKEND}={name}: that backend runs on "
                         f"{'/'.join(get_backend(name).devices)} tensors, {what} runs on "
                         f"{device_type}; {fix}")


def choose_backend(args: AttnArgs, requested: Optional[str] = None) -> Backend:
    """The backend for this call: `requested`, else $PREFIX_ATTN_BACKEND, else the best one
    that accepts the device and arguments."""
    name = requested or os.environ.get(ENV_BACKEND) or None
    dev = args.q.device.type
    if not requested and name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"environment variable {ENV_BACKEND}={name!r}: expected one of "
                         f"{', '.join(BACKEND_NAMES)} (or unset)")
    if name is not None:
        b = get_backend(name)
        if dev not in b.devices:
            raise ValueError(f"backend {name!r} runs on {b.devices} tensors, but q is on {dev}")
        why = b.unsupported(args)
        if why:
            raise ValueError(f"backend {name!r} cannot run this call: {why}")
        return b
    for cand in available_backends():
        b = _REGISTRY[cand]
        if dev in b.devices and not b.unsupported(args):
            return b
    raise RuntimeError(f"no backend accepts {dev} tensors of dtype {args.q.dtype}")
