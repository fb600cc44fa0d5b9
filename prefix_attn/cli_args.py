"""What the subcommands of ``prefix-attn`` share in their arguments: the help layout (the
description as written, each meaningful default shown), number parsers that refuse values
out of range at parse time (argparse's usage error, exit status 2), switching
transformers' own progress bars off with ``--no-progress``, and the versions line of
``--version`` and ``check``. Importing it imports neither torch nor transformers (the
parsers run before them: see :mod:`prefix_attn.cli_parsers`)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
from importlib import metadata
from typing import Callable, Optional


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default, except where it says nothing
    (None, a flag's False/True, an empty list: the help text says the default in words)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or isinstance(default, bool) or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def int_at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (and <= ``maximum``, when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return parse


# --seed of every command: what torch's generators take (less than 2**64; the demo seeds one
# with seed + 1), kept to a signed 64-bit integer, negative ones included (torch wraps them,
# and runs seeded so must still resume). Larger values raised an OverflowError from
# torch.manual_seed, after the data was read or the model loaded.
MAX_SEED = 2 ** 63 - 1
seed = int_at_least(-MAX_SEED - 1, MAX_SEED)


def float_where(accept: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse ``type``: a finite number for which ``accept`` holds (else: "must be
    ``requirement``")."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


@contextlib.contextmanager
def transformers_progress(enabled: bool):
    """transformers' own bars ("Loading weights", "Writing model shards") off unless ``enabled``."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def device_problem(name: str):
    """(torch.device, None) for a usable ``--device``, else (None, what is wrong with it)."""
    import torch  # here: the parsers of this module are used before torch loads

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists every device type it knows
        return None, f"--device {name}: not a torch device; use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: no backend runs there
        return None, f"--device {name}: prefix_attn runs on cpu or cuda (cuda:N)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, f"--device {name}: CUDA is not available on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None, f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)"
    return device, None


def env_problem(device_type: Optional[str], what: str) -> Optional[str]:
    """What is wrong with the PREFIX_ATTN_* switches set in the environment for a command
    whose ``what`` runs on ``device_type`` (None: nothing), checked before any work; with
    ``device_type`` None, only the switches' values (a backend name that is none)."""
    import os

    from .backends import BACKEND_NAMES, ENV_BACKEND, check_env_backend, check_switches

    try:
        if device_type is not None:
            check_env_backend(device_type, what)
            return None
        check_switches()
    except ValueError as exc:
        return str(exc)
    name = os.environ.get(ENV_BACKEND) or None
    if name is not None and name not in BACKEND_NAMES:
        return (f"environment variable {ENV_BACKEND}={name!r}: not a backend; the backends are "
                f"{', '.join(BACKEND_NAMES)} (or unset it)")
    return None


def max_positions(config) -> Optional[int]:
    """The positions a model numbers (``max_position_embeddings`` or ``n_positions`` of its text
    config), None when it names neither. Tokens after a prefix of P are numbered from P, so
    prefix + text must fit in them."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def versions() -> str:
    """One line for a bug report: this package, Python, torch (its CUDA and the GPUs it sees,
    counted without starting CUDA), and the optional packages, "-" for those not installed
    (read from the installed metadata: nothing is imported)."""
    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    import torch

    from prefix_attn import __version__
    from prefix_attn.hf.support import MIN_TRANSFORMERS, transformers_too_old

    hf = installed("transformers")
    floor = ".".join(map(str, MIN_TRANSFORMERS))
    old = hf != "-" and transformers_too_old(hf) is not None
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
            if torch.version.cuda else "no CUDA")
    return (f"prefix_attn {__version__}, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({cuda}), triton {installed('triton')}, transformers {hf}"
            f"{f' (too old: the HF integration needs {floor} or newer)' if old else ''}, "
            f"peft {installed('peft')}, accelerate {installed('accelerate')}")


def silence_stdout() -> None:
    """Standard output's reader is gone (``| head``): nothing more may go there, not even the
    flush at Python's exit (another BrokenPipeError, printed as "Exception ignored")."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


# apply_chat_template's own arguments: set by --chat itself, not template variables
_CHAT_RESERVED = frozenset(("conversation", "messages", "tools", "documents", "add_generation_prompt",
                            "continue_final_message", "tokenize", "return_dict", "return_tensors",
                            "return_assistant_tokens_mask", "chat_template", "padding", "truncation",
                            "max_length", "tokenizer_kwargs"))


def chat_option(text: str) -> tuple:
    """An argparse ``type``: ``KEY=VALUE``, a variable of the chat template (``enable_thinking=false``
    for Qwen3), the value read as JSON (``false``, ``3``, ``"x"``, ``[...]``), else as the text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a template variable, e.g. "
                                         f"enable_thinking=false; got {text!r}")
    if key in _CHAT_RESERVED:
        raise argparse.ArgumentTypeError(f"{key} is set by --chat itself (apply_chat_template's own "
                                         f"argument), not a template variable")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def stop_text(text: str) -> str:
    """An argparse ``type``: a stop text of ``generate --stop``, not empty (an empty text would be
    found at once) and UTF-8 (bytes that are not come as lone surrogates)."""
    if not text:
        raise argparse.ArgumentTypeError("the stop text must not be empty")
    problem = not_utf8(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"the stop text {problem}")
    return text


def not_utf8(text: str) -> Optional[str]:
    """What is wrong with a command-line ``text`` whose bytes were not UTF-8 (Python gives them
    as lone surrogates), e.g. "is not UTF-8 (byte 0xff at character 3)"; None if they were."""
    bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
    if bad is None:
        return None
    return f"is not UTF-8 (byte 0x{ord(text[bad]) - 0xdc00:02x} at character {bad + 1})"
