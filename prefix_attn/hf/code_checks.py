"""What a transformers model's own code does with the prefix selection, read from its source
when a bank is attached: the attention function must be reached (through the attention
interface, with ``**kwargs`` passed down every call on the way) and get nothing it cannot
apply (a position bias). A model that drops the keyword raises at an eager forward (the
post-hook); inside torch.compile nothing can tell, and its prefixes would be ignored silently.
Source that cannot be read or parsed is not judged."""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Optional

from torch import nn


def _transformers_class(cls: type) -> bool:
    return cls.__module__.startswith("transformers.models.")


def self_attention_modules(model: nn.Module) -> list:
    """``(qualified name, module)`` of the language model's self-attention modules: transformers
    modules with a layer index whose class name ends in "Attention", not cross-attention (by
    name, or GPT-2's ``is_cross_attention``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "layer_idx", None), int) and _transformers_class(type(m))
            and type(m).__name__.endswith("Attention") and "Cross" not in type(m).__name__
            and not getattr(m, "is_cross_attention", False)]


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> Optional[str]:
    """The source of ``cls`` and of its transformers bases (None when unreadable)."""
    try:
        return "\n".join(inspect.getsource(k) for k in cls.__mro__ if _transformers_class(k))
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _forward_tree(cls: type) -> Optional[ast.AST]:
    """The parsed ``forward`` of ``cls`` (None when unreadable)."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return None


def computes_attention_itself(cls: type) -> bool:
    """Whether the self-attention class ``cls`` never looks up the attention interface (GIT's
    BERT-style attention, in a modeling module whose vision tower does)."""
    source = _class_source(cls)
    return source is not None and "ALL_ATTENTION_FUNCTIONS" not in source


def _is_self_attr(node, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr \
        and isinstance(node.value, ast.Name) and node.value.id == "self"


def _loop_names(tree: ast.AST, attr: str) -> set:
    """Names a ``for`` loop binds to the items of ``self.<attr>`` (``for layer in self.layers``,
    ``for i, layer in enumerate(self.layers[:n])``, ``zip(...)``): the calls of a module list's
    members."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and any(_is_self_attr(n, attr) for n in ast.walk(node.iter)):
            names.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    return names


@functools.lru_cache(maxsize=None)
def _calls_of(cls: type, attr: str) -> Optional[tuple]:
    """For each call of ``self.<attr>(...)``, ``self.<attr>[i](...)`` or of a loop variable over
    ``self.<attr>`` in ``cls.forward``: whether it passes ``**kwargs`` on. None when the source
    cannot be read."""
    tree = _forward_tree(cls)
    if tree is None:
        return None
    members = _loop_names(tree, attr)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.value if isinstance(node.func, ast.Subscript) else node.func
        if _is_self_attr(func, attr) or isinstance(func, ast.Name) and func.id in members:
            out.append(any(k.arg is None for k in node.keywords))
    return tuple(out)


def kwargs_dropped_on_the_way(model: nn.Module) -> Optional[str]:
    """``"Parent.attr"`` of the first call on the way from ``model`` down to a self-attention
    module that does not pass ``**kwargs`` on (StableLM's decoder layer calls its attention with
    named arguments only), or None. A module list's members are judged by the calls of the loop
    variables over it in the forward of the module holding the list."""
    modules = dict(model.named_modules())
    for name, _ in self_attention_modules(model):
        parts = name.split(".")
        for i in range(len(parts)):
            parent = modules.get(".".join(parts[:i]))
            if parent is None or isinstance(parent, (nn.ModuleList, nn.ModuleDict)) \
                    or not _transformers_class(type(parent)):
                continue
            calls = _calls_of(type(parent), parts[i])
            if calls and not any(calls):
                return f"{type(parent).__name__}.{parts[i]}"
    return None


@functools.lru_cache(maxsize=None)
def passes_position_bias(cls: type) -> bool:
    """Whether ``cls.forward`` hands a ``position_bias`` to a call (the attention function):
    a bias on the scores that the kernels do not add (Inkling's relative logits)."""
    tree = _forward_tree(cls)
    return tree is not None and any(
        isinstance(node, ast.Call) and any(k.arg == "position_bias" for k in node.keywords)
        for node in ast.walk(tree))
